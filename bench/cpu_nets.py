"""Whole-net CPU benchmark: forward (and optionally forward+backward) time, achieved GFLOP/s against
the machine's float32 GEMM rate, and peak RSS of the released deploy nets, fused and unfused.

    python bench/cpu_nets.py                       # embs, vgg, res deploy at their declared size
    python bench/cpu_nets.py --nets vgg --backward # + forward/backward of vgg
    python bench/cpu_nets.py --threads 2 --variants fused
    python bench/cpu_nets.py --nets my_deploy.prototxt --size 97
    python bench/cpu_nets.py --keep-freed-memory   # the allocator as the segaware-caffe command sets it
    python bench/cpu_nets.py --quick               # small inputs, small GEMM (smoke run, seconds)

Each variant (net, fused or unfused, forward or forward+backward, thread count) runs in its own
process, so its peak RSS and its OpenMP pool are its own. In that process the float32 GEMM rate is
measured at the same thread count (a square torch.mm, median of several, half of them before the
net runs and half after); the net's work is the FLOPs of its Convolution, Deconvolution,
InnerProduct and NormConv layers (segaware_caffe.flops; forward+backward counts three times the
forward). The "GEMM bound" is that work at the GEMM rate, and measured/bound says how far the net is
from it. Times are medians of the repeats after a first, untimed-for-the-median run.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGAWARE_SHARED", REPO.parent / "shared"))
CONFIG = SHARED / "reference" / "segaware" / "config"
RELEASED = ("embs", "vgg", "res")


def net_file(net):
    """config/<net>/deploy.prototxt for a released net's name, else the path given."""
    if net in RELEASED:
        return CONFIG / net / "deploy.prototxt"
    return Path(net)


def gemm_rate(torch, size, repeats):
    """float32 GFLOP/s samples of a size x size x size torch.mm (one untimed warm-up)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        samples.append(2.0 * size ** 3 / (time.perf_counter() - t) / 1e9)
    return samples


def child(args):
    sys.path.insert(0, str(REPO))
    import torch
    from segaware_caffe import caffe_proto
    import segaware_caffe as sc
    from segaware_caffe.flops import net_flops
    from segaware_caffe.resize import resize_deploy

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        sc.keep_freed_memory()
    gemm = gemm_rate(torch, args.gemm_size, args.gemm_repeat)
    net_param = caffe_proto.read_net(net_file(args.net))
    if args.size:
        net_param = resize_deploy(net_param, args.size)
    t0 = time.perf_counter()
    net = sc.Net(net_param, phase="test", fuse=args.fuse)
    build_s = time.perf_counter() - t0
    flops = net_flops(net, backward=args.backward)
    for p in net.learnable_params:           # non-trivial values; the deploy fillers are zeros
        with torch.no_grad():
            p.normal_(0, 0.01)
    inputs = {name: torch.randn(shape) for name, shape in net.input_shapes.items()}
    grad = args.backward
    if grad:
        for x in inputs.values():
            x.requires_grad_(True)
    times = []
    for i in range(args.repeat + 1):
        t = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = net.forward(**inputs)
            if grad:
                total = sum(v.float().sum() for v in out.values() if v.requires_grad)
                total.backward()
        times.append(time.perf_counter() - t)
        del out
    gemm += gemm_rate(torch, args.gemm_size, args.gemm_repeat)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"first_s": times[0],
                      "median_s": statistics.median(times[1:]) if args.repeat else times[0],
                      "peak_rss_gb": rss_gb, "build_s": build_s, "fused": len(net.fused_groups),
                      "flops": flops, "gemm_gflops": statistics.median(gemm),
                      "load": os.getloadavg()[0]}))


def run_variant(net, fuse, backward, size, threads, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--net", str(net),
           "--repeat", str(args.repeat), "--threads", str(threads),
           "--gemm-size", str(args.gemm_size), "--gemm-repeat", str(args.gemm_repeat)] + \
          (["--fuse"] if fuse else []) + (["--backward"] if backward else []) + \
          (["--keep-freed-memory"] if args.keep_freed_memory else []) + \
          (["--size", str(size)] if size else [])
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{net} ({'fused' if fuse else 'unfused'}, {threads} thread(s)) failed:\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


HEADER = (f"{'net':8} {'variant':15} {'thr':>3} {'first s':>8} {'median s':>9} {'RSS GB':>7} "
          f"{'build s':>7} {'GFLOP':>7} {'GFLOP/s':>8} {'GEMM':>7} {'of GEMM':>7} {'bound s':>8} "
          f"{'meas/bnd':>8} {'load':>5}")


def format_row(net, label, threads, r):
    achieved = r["flops"] / r["median_s"] / 1e9
    bound = r["flops"] / (r["gemm_gflops"] * 1e9)
    ratio = f"{r['median_s'] / bound:8.2f}" if bound > 0 else f"{'-':>8}"
    return (f"{net:8} {label:15} {threads:3d} {r['first_s']:8.2f} {r['median_s']:9.4g} "
            f"{r['peak_rss_gb']:7.2f} {r['build_s']:7.2f} {r['flops'] / 1e9:7.4g} {achieved:8.4g} "
            f"{r['gemm_gflops']:7.1f} {achieved / r['gemm_gflops']:7.1%} {bound:8.3g} {ratio} "
            f"{r['load']:5.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(RELEASED),
                        help="released net names (embs, vgg, res) or deploy prototxt paths")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward of vgg "
                        "(of every net given as a path)")
    parser.add_argument("--size", type=int, default=0, help="input size (0 = the declared size)")
    parser.add_argument("--quick", action="store_true",
                        help="released nets at input size 65 (unless --size), one repeat, a 512^3 GEMM")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--variants", nargs="+", choices=("unfused", "fused"),
                        default=["unfused", "fused"])
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"),
                        help="OMP_WAIT_POLICY for the timed processes (default: inherited)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="the allocator as the segaware-caffe command sets it: freed memory "
                             "stays in the process (segaware_caffe.keep_freed_memory)")
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--gemm-repeat", type=int, default=3,
                        help="GEMM timings before and again after the net (median of all)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--net", help=argparse.SUPPRESS)
    parser.add_argument("--fuse", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.threads = args.threads[0]
        return child(args)
    for net in args.nets:
        if not net_file(net).is_file():
            parser.error(f"{net_file(net)} not found (a released net's name: {', '.join(RELEASED)}, "
                         f"with the reference material at {CONFIG}; or a prototxt path)")
    def size_of(net):   # --quick shrinks the released nets; a net given as a path keeps its size
        return args.size or (65 if args.quick and net in RELEASED else 0)

    if args.quick:
        args.repeat, args.gemm_size, args.gemm_repeat = 1, 512, 2
    sizes = sorted({size_of(net) for net in args.nets})
    policy = args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY", "(unset)")
    print(f"input size: {', '.join(str(s) if s else 'declared' for s in sizes)}; repeats: {args.repeat}; GEMM: float32 "
          f"{args.gemm_size}^3 torch.mm, median of {2 * args.gemm_repeat}; OMP_WAIT_POLICY={policy}; "
          f"freed memory {'kept (as the command line)' if args.keep_freed_memory else 'returned (the default)'}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(HEADER, flush=True)
    variants = [(net, False) for net in args.nets] + \
               [(net, True) for net in args.nets if args.backward and net not in ("embs", "res")]
    for net, backward in variants:
        label_net = net if net in RELEASED else Path(net).stem[:8]
        for threads in args.threads:
            results = {}
            for variant in args.variants:
                fuse = variant == "fused"
                r = run_variant(net, fuse, backward, size_of(net), threads, args)
                results[variant] = r
                label = variant + (" fwd+bwd" if backward else " fwd")
                print(format_row(label_net, label, threads, r)
                      + (f"   ({r['fused']} fused convs)" if fuse else ""), flush=True)
            if len(results) < 2:
                continue
            u, f = results["unfused"], results["fused"]
            if not f["fused"]:
                print(f"{label_net:8} no segmentation-aware convolution to fuse: both variants run "
                      f"the same layers (their difference is run-to-run noise)", flush=True)
                continue
            print(f"{label_net:8} ratio unfused/fused at {threads} thread(s): time "
                  f"{u['median_s'] / f['median_s']:.2f}x, peak RSS "
                  f"{u['peak_rss_gb'] / f['peak_rss_gb']:.2f}x", flush=True)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
