"""Per-op benchmarks of the segmentation-aware kernels.

Compares, at the shape of vgg conv1_2 (1 x 64 x 321 x 321 -> 64, kernel 3, pad 1):
  fused    kernels.masked_conv2d with a precomputed mask (what Net runs for the segaware pattern)
  unfused  the released Caffe recipe in torch: Im2col (unfold), Tile, Eltwise PROD, Conv
           bottom_is_im2col (matmul); three (N, C*K, Ho*Wo) intermediates
  conv2d   a plain F.conv2d of the same shape (cuDNN on CUDA): the floor
  im2dist  kernels.im2dist L1 of a 64-channel embedding of the same size
each forward only ("forward", under no_grad) and forward + backward ("train"). Every variant runs in
its own subprocess so its peak memory is its own: on CPU the peak RSS above the inputs
(resource.getrusage), on CUDA torch.cuda.max_memory_allocated above the inputs. Times are the
median wall time of the repeats, and the process CPU time (the steadier number on a shared
machine). Ratios are computed from this run only.

    python bench/bench_ops.py [--quick] [--device cuda] [--threads N] [--size S] [--channels C]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("fused", "unfused", "conv2d", "im2dist")
MODES = ("forward", "train")


def _make_inputs(torch, args):
    generator = torch.Generator().manual_seed(0)
    size, channels = args.size, args.channels
    dtype = torch.float32
    tensors = {
        "x": torch.randn(1, channels, size, size, generator=generator, dtype=dtype),
        "emb": torch.randn(1, channels, size, size, generator=generator, dtype=dtype),
        "weight": torch.randn(channels, channels, 3, 3, generator=generator, dtype=dtype) * 0.05,
        "bias": torch.randn(channels, generator=generator, dtype=dtype),
        "mask": torch.rand(1, 9, size, size, generator=generator, dtype=dtype),
        "grad": torch.randn(1, channels, size, size, generator=generator, dtype=dtype),
    }
    return {name: t.to(args.device) for name, t in tensors.items()}


def _variant_fn(torch, variant, tensors, train):
    import torch.nn.functional as F
    from segaware_caffe.kernels import im2dist, masked_conv2d

    x, weight, bias, mask = (tensors[k] for k in ("x", "weight", "bias", "mask"))
    emb, grad = tensors["emb"], tensors["grad"]
    if train:
        for t in (x, weight, bias, mask, emb):
            t.requires_grad_(True)

    def unfused():
        batch, channels = x.shape[:2]
        columns = F.unfold(x, 3, 1, 1, 1)                                    # Im2col
        tiled = mask.repeat(1, channels, 1, 1).view(batch, channels * 9, -1)  # Tile
        hit = columns * tiled                                                # Eltwise PROD
        out = torch.matmul(weight.view(weight.shape[0], -1), hit)           # Conv im2col
        return out.view(batch, -1, *x.shape[2:]) + bias.view(1, -1, 1, 1)

    forward = {
        "fused": lambda: masked_conv2d(x, weight, bias, mask=mask, kernel_size=3, pad=1),
        "unfused": unfused,
        "conv2d": lambda: F.conv2d(x, weight, bias, padding=1),
        "im2dist": lambda: im2dist(emb, 3, pad=1, norm="L1"),
    }[variant]
    if not train:
        def run():
            with torch.no_grad():
                return forward()
        return run

    def run_train():
        for t in (x, weight, bias, mask, emb):
            t.grad = None
        out = forward()
        out.backward(grad if out.shape == grad.shape else torch.ones_like(out))
        return out
    return run_train


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def worker(args):
    """Time one (variant, mode) and print one JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, REPO)
    tensors = _make_inputs(torch, args)
    fn = _variant_fn(torch, args.variant, tensors, args.mode == "train")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    walls, cpus = [], []
    for index in range(args.warmup + args.repeats):
        _sync(torch, args.device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(torch, args.device)
        if index >= args.warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    result = {"variant": args.variant, "mode": args.mode, "wall_s": statistics.median(walls),
              "cpu_s": statistics.median(cpus)}
    if cuda:
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20
    else:
        result["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    print(json.dumps(result))
    return 0


def run_all(args):
    results = {}
    for mode in MODES:
        for variant in VARIANTS:
            command = [sys.executable, os.path.abspath(__file__), "--worker", variant,
                       "--mode", mode, "--device", args.device, "--threads", str(args.threads),
                       "--size", str(args.size), "--channels", str(args.channels),
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if completed.returncode:
                print(f"{variant}/{mode} failed:\n{completed.stderr}", file=sys.stderr)
                return 1
            results[variant, mode] = json.loads(completed.stdout.strip().splitlines()[-1])
            r = results[variant, mode]
            print(f"  {mode:8s} {variant:8s} wall {r['wall_s'] * 1e3:9.1f} ms   cpu "
                  f"{r['cpu_s'] * 1e3:9.1f} ms   peak +{r['peak_mb']:8.1f} MB", flush=True)
    print("\nratios (this run):")
    for mode in MODES:
        fused, unfused, conv = (results[v, mode] for v in ("fused", "unfused", "conv2d"))
        floor = "cuDNN conv" if args.device == "cuda" else "F.conv2d"
        print(f"  {mode:8s} unfused/fused  wall {unfused['wall_s'] / fused['wall_s']:5.2f}x  cpu "
              f"{unfused['cpu_s'] / fused['cpu_s']:5.2f}x  peak memory "
              f"{unfused['peak_mb'] / max(fused['peak_mb'], 1e-3):6.1f}x")
        print(f"  {mode:8s} fused/{floor:10s} wall {fused['wall_s'] / conv['wall_s']:5.2f}x  cpu "
              f"{fused['cpu_s'] / conv['cpu_s']:5.2f}x")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, no warm-up (< 2 min on CPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (default: every core)")
    parser.add_argument("--size", type=int, default=321, help="image height and width")
    parser.add_argument("--channels", type=int, default=64, help="input = output channels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="forward", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    if args.worker:
        args.variant = args.worker
        return worker(args)
    print(f"segaware ops on {args.device}, 1x{args.channels}x{args.size}x{args.size} -> "
          f"{args.channels}, k3 p1, float32, {args.threads} thread(s), {args.repeats} repeat(s)")
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
