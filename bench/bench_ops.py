"""Per-op benchmarks of the segmentation-aware kernels.

Compares, at the shape of vgg conv1_2 by default (1 x 64 x 321 x 321 -> 64, kernel 3, pad 1):
  fused    kernels.masked_conv2d with a precomputed mask (what Net runs for the segaware pattern)
  unfused  the released Caffe recipe in torch: Im2col (unfold), Tile, Eltwise PROD, Conv
           bottom_is_im2col (matmul); three (N, C*K, Ho*Wo) intermediates
  conv2d   a plain F.conv2d of the same shape (cuDNN on CUDA): the floor
  im2dist  kernels.im2dist L1 of a C-channel embedding of the same size
each forward only ("forward", under no_grad) and forward + backward ("train"), at each precision:
  fp32   float32, TF32 off for cuDNN and for matmuls (the fused op then runs 3xTF32 on tensor
         cores, about float32 accuracy)
  tf32   float32, TF32 on for both (the fused op runs TF32 mma)
  bf16 / fp16   activations and weights in the half type (the mask and bias in float32)
torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32 are set explicitly for
every precision (cuDNN's default, TF32 on, would otherwise be compared with our float32).

Every (variant, mode, precision) runs in its own subprocess so its peak memory is its own: on CPU
the peak RSS above the inputs (resource.getrusage), on CUDA torch.cuda.max_memory_allocated
above the inputs. On CPU times are the median wall (and process CPU) time of the repeats; on
CUDA the median over the repeats of CUDA-event time of `--inner` back-to-back calls. Ratios are
computed from this run only. `--json PATH` also writes every result.

    python bench/bench_ops.py [--quick] [--device cuda] [--precisions fp32,tf32,bf16]
        [--variants fused,conv2d] [--modes train] [--threads N] [--batch N] [--size S]
        [--channels C] [--json results.json]
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
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def set_precision(torch, precision):
    """TF32 on only for "tf32", for cuDNN and for matmuls; returns the activation dtype."""
    tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _make_inputs(torch, args, dtype):
    generator = torch.Generator().manual_seed(0)
    size, channels, batch = args.size, args.channels, args.batch
    f32 = torch.float32
    tensors = {
        "x": torch.randn(batch, channels, size, size, generator=generator, dtype=f32).to(dtype),
        "emb": torch.randn(batch, channels, size, size, generator=generator, dtype=f32).to(dtype),
        "weight": (torch.randn(channels, channels, 3, 3, generator=generator, dtype=f32)
                   * 0.05).to(dtype),
        "bias": torch.randn(channels, generator=generator, dtype=f32),
        "mask": torch.rand(batch, 9, size, size, generator=generator, dtype=f32),
        "grad": torch.randn(batch, channels, size, size, generator=generator, dtype=f32).to(dtype),
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
        columns = F.unfold(x, 3, 1, 1, 1)                                     # Im2col
        tiled = mask.to(x.dtype).repeat(1, channels, 1, 1).view(batch, channels * 9, -1)  # Tile
        hit = columns * tiled                                                 # Eltwise PROD
        out = torch.matmul(weight.view(weight.shape[0], -1), hit)            # Conv im2col
        return out.view(batch, -1, *x.shape[2:]) + bias.to(x.dtype).view(1, -1, 1, 1)

    forward = {
        "fused": lambda: masked_conv2d(x, weight, bias, mask=mask, kernel_size=3, pad=1),
        "unfused": unfused,
        "conv2d": lambda: F.conv2d(x, weight, bias.to(x.dtype), padding=1),
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


def worker(args):
    """Time one (variant, mode, precision) and print one JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, REPO)
    dtype = set_precision(torch, args.precision)
    tensors = _make_inputs(torch, args, dtype)
    fn = _variant_fn(torch, args.variant, tensors, args.mode == "train")
    cuda = args.device == "cuda"
    result = {"variant": args.variant, "mode": args.mode, "precision": args.precision}
    if cuda:
        torch.cuda.synchronize()
        for _ in range(max(1, args.warmup)):
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / args.inner)
        result.update(wall_s=statistics.median(times), cpu_s=float("nan"),
                      peak_mb=(torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20)
    else:
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
        walls, cpus = [], []
        for index in range(args.warmup + args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            if index >= args.warmup:
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
        result.update(wall_s=statistics.median(walls), cpu_s=statistics.median(cpus),
                      peak_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss)
                      / 1024)
    print(json.dumps(result))
    return 0


def run_all(args):
    results = {}
    for precision in args.precisions:
        for mode in args.modes:
            for variant in args.variants:
                command = [sys.executable, os.path.abspath(__file__), "--worker", variant,
                           "--mode", mode, "--precision", precision, "--device", args.device,
                           "--threads", str(args.threads), "--batch", str(args.batch),
                           "--size", str(args.size), "--channels", str(args.channels),
                           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                           "--inner", str(args.inner)]
                completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                if completed.returncode:
                    print(f"{variant}/{mode}/{precision} failed:\n{completed.stderr}",
                          file=sys.stderr)
                    return 1
                r = results[variant, mode, precision] = json.loads(
                    completed.stdout.strip().splitlines()[-1])
                print(f"  {precision:5s} {mode:8s} {variant:8s} time {r['wall_s'] * 1e3:9.3f} ms"
                      f"   peak +{r['peak_mb']:8.1f} MB", flush=True)
    floor = "cuDNN" if args.device == "cuda" else "F.conv2d"
    print(f"\nratios (this run): fused / {floor} at the same precision, and unfused / fused")
    for precision in args.precisions:
        for mode in args.modes:
            fused = results.get(("fused", mode, precision))
            conv = results.get(("conv2d", mode, precision))
            if fused is None or conv is None:
                continue
            line = (f"  {precision:5s} {mode:8s} fused/{floor} "
                    f"{fused['wall_s'] / conv['wall_s']:6.2f}x")
            unfused = results.get(("unfused", mode, precision))
            if unfused:
                line += (f"   unfused/fused {unfused['wall_s'] / fused['wall_s']:6.2f}x  peak "
                         f"memory {unfused['peak_mb'] / max(fused['peak_mb'], 1e-3):6.1f}x")
            print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([dict(r) for r in results.values()], handle, indent=1)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat after 1 warm-up call (< 2 min on CPU)")
    parser.add_argument("--precisions", default=None,
                        help=f"comma-separated, of {','.join(PRECISIONS)} (default: fp32 on CPU, "
                             f"fp32,tf32,bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (default: every core)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=321, help="image height and width")
    parser.add_argument("--channels", type=int, default=64, help="input = output channels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inner", type=int, default=10, help="CUDA: calls per timed repeat")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="forward", help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:   # one warm-up call still: the first call imports torch's compiler stack
        args.repeats, args.warmup, args.inner = 1, 1, 1
    if args.worker:
        args.variant = args.worker
        return worker(args)
    if args.precisions is None:
        args.precisions = "fp32,tf32,bf16" if args.device == "cuda" else "fp32"
    for name, allowed in (("precisions", PRECISIONS), ("variants", VARIANTS), ("modes", MODES)):
        values = getattr(args, name).split(",")
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"unknown {name[:-1]} {unknown[0]!r}; choose from {', '.join(allowed)}")
        setattr(args, name, values)
    print(f"segaware ops on {args.device}, {args.batch}x{args.channels}x{args.size}x{args.size} "
          f"-> {args.channels}, k3 p1, precisions {','.join(args.precisions)}, {args.threads} "
          f"thread(s), {args.repeats} repeat(s)")
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
