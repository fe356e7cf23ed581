"""NormConvMeanfield at the released shape on CPU: time and peak memory of its parts.

    python bench/bench_meanfield.py              # 1x21x257x257, bilateral 66 ch (64 emb + 2 xy), spatial 2 ch
    python bench/bench_meanfield.py --backward   # + backward of one iteration and of the attention
    python bench/bench_meanfield.py --size 65    # smaller image (smoke run)

Geometry as config/res: bilateral kernel 13 pad 54 dilation 9, spatial kernel 5 pad 2, scale 1,
remove flags true. Parts timed separately: the attention maps (computed once per forward, from
the features) and one CRF update (softmax, two messages, three C x C products); the released
layer does 2 updates. Peak memory is the rise of the process's resident-set high-water mark
during each part (reset before each part where Linux allows it, /proc/self/clear_refs).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segaware_caffe.kernels.meanfield import MessageSpec, meanfield_update, message_attention  # noqa: E402

BILATERAL = MessageSpec(13, pad=54, dilation=9, scale=1.0)
SPATIAL = MessageSpec(5, pad=2, dilation=1, scale=1.0)


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(label, fn):
    """Run fn once, print wall time and peak RSS rise; return fn's result."""
    exact = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM") - before
    note = "" if exact else " (peak not resettable: process-wide high-water mark)"
    print(f"{label:<44} {elapsed:8.3f} s   peak +{peak / 1024:8.1f} MiB{note}", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=257, help="image height and width (default 257)")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--backward", action="store_true", help="also time the backward passes")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, c, size = 1, args.classes, args.size
    unary = 3 * torch.randn(n, c, size, size, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    xy = 0.05 * torch.stack([xs, ys])[None]
    feat_bilateral = torch.cat([torch.randn(n, 64, size, size, generator=gen), xy], 1)
    feat_spatial = xy.clone()
    eye = torch.eye(c)
    matrices = (eye, eye.clone(), -eye)
    print(f"NormConvMeanfield parts, CPU, {torch.get_num_threads()} threads, N={n} C={c} {size}x{size}, "
          f"bilateral {feat_bilateral.shape[1]} ch k13 d9 p54, spatial 2 ch k5 p2")
    requires_grad = args.backward
    for t in (unary, feat_bilateral, feat_spatial):
        t.requires_grad_(requires_grad)

    def attention():
        return (message_attention(feat_bilateral, BILATERAL), message_attention(feat_spatial, SPATIAL))

    with torch.set_grad_enabled(requires_grad):
        attention_maps = measure("attention maps (once per forward)", attention)
        # the update's backward stops at these leaves; the attention's own backward is timed apart
        leaves = [a.detach().requires_grad_(requires_grad) for a in attention_maps]
        x = unary.detach().clone().requires_grad_(requires_grad)

        def update():
            return meanfield_update(x, unary, *leaves, *matrices, bilateral=BILATERAL, spatial=SPATIAL)

        x_next = measure("one CRF update (forward)", update)
    if args.backward:
        grad = torch.randn(x_next.shape, generator=gen)
        measure("one CRF update (backward to Q, U, attention)",
                lambda: torch.autograd.backward(x_next, grad))
        measure("attention maps (backward to the features)",
                lambda: torch.autograd.backward(attention_maps, [a.grad for a in leaves]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
