"""Whole-net CPU benchmark: forward (and optionally forward+backward) time and peak RSS of the
released deploy nets, fused and unfused, each variant in its own process so peak RSS is its own.

    python bench/cpu_nets.py                       # embs, vgg, res deploy at their declared size
    python bench/cpu_nets.py --nets vgg --backward # + forward/backward of vgg
    python bench/cpu_nets.py --quick               # small inputs (smoke run, seconds)

Prints one line per variant and the fused/unfused ratios measured in this run.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGAWARE_SHARED", REPO.parent / "shared"))
CONFIG = SHARED / "reference" / "segaware" / "config"


def child(args):
    sys.path.insert(0, str(REPO))
    import torch
    from segaware_caffe import caffe_proto
    import segaware_caffe as sc
    from segaware_caffe.resize import resize_deploy

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net_param = caffe_proto.read_net(CONFIG / args.net / "deploy.prototxt")
    if args.size:
        net_param = resize_deploy(net_param, args.size)
    t0 = time.perf_counter()
    net = sc.Net(net_param, phase="test", fuse=args.fuse)
    build_s = time.perf_counter() - t0
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
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"first_s": times[0], "steady_s": min(times[1:]) if args.repeat else times[0],
                      "peak_rss_gb": rss_gb, "build_s": build_s, "fused": len(net.fused_groups)}))


def run_variant(net, fuse, backward, size, repeat, threads):
    cmd = [sys.executable, __file__, "--child", "--net", net, "--repeat", str(repeat),
           "--threads", str(threads)] + (["--fuse"] if fuse else []) + \
          (["--backward"] if backward else []) + (["--size", str(size)] if size else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{net} ({'fused' if fuse else 'unfused'}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["embs", "vgg", "res"])
    parser.add_argument("--backward", action="store_true", help="also time forward+backward of vgg")
    parser.add_argument("--size", type=int, default=0, help="input size (0 = the declared size)")
    parser.add_argument("--quick", action="store_true", help="small inputs, one repeat")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--net", help=argparse.SUPPRESS)
    parser.add_argument("--fuse", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    size, repeat = (65, 1) if args.quick else (args.size, args.repeat)
    print(f"CPU threads: {args.threads}; input size: {size or 'declared'}; repeats: {repeat}")
    print(f"{'net':6} {'variant':18} {'first s':>8} {'steady s':>9} {'peak RSS GB':>12} {'build s':>8}")
    variants = [(net, False) for net in args.nets] + \
               ([("vgg", True)] if args.backward and "vgg" in args.nets else [])
    for net, backward in variants:
        results = {}
        for fuse in (False, True):
            r = run_variant(net, fuse, backward, size, repeat, args.threads)
            results[fuse] = r
            label = ("fused" if fuse else "unfused") + (" fwd+bwd" if backward else " fwd")
            print(f"{net:6} {label:18} {r['first_s']:8.2f} {r['steady_s']:9.2f} "
                  f"{r['peak_rss_gb']:12.2f} {r['build_s']:8.2f}"
                  + (f"   ({r['fused']} fused convs)" if fuse else ""), flush=True)
        u, f = results[False], results[True]
        if not f["fused"]:
            print(f"{net:6} no segmentation-aware convolution to fuse: both variants run the same "
                  f"layers (their difference is run-to-run noise)", flush=True)
            continue
        print(f"{net:6} ratio unfused/fused: time {u['steady_s'] / f['steady_s']:.2f}x, "
              f"peak RSS {u['peak_rss_gb'] / f['peak_rss_gb']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
