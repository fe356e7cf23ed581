"""DenseCRF at DeepLab's size on CPU: time of the lattice construction, the filtering and the
whole layer.

    python bench/bench_densecrf.py               # 1x21x321x321, 10 iterations, VOC settings
    python bench/bench_densecrf.py --size 97     # smaller image (smoke run)
    python bench/bench_densecrf.py --threads 1

Settings as DeepLab's VOC CRF: positional w 3, xy std 3; bilateral w 4, xy std 121, rgb std 5;
random scores and a random 0..255 image (the lattice of a real photograph has fewer vertices, so
this is the slow case). Wall-clock and process CPU time are both printed: on a shared machine
the CPU time is the steadier number.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segaware_caffe.caffe_proto import read_net  # noqa: E402
from segaware_caffe import BuildContext  # noqa: E402
from segaware_caffe.layer import layer_class  # noqa: E402
from segaware_caffe.kernels.dense_crf import Permutohedral, pixel_features  # noqa: E402


def timed(what, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    print(f"{what:<42} {time.perf_counter() - wall:7.2f} s wall {time.process_time() - cpu:7.2f} s cpu")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size, g = args.size, torch.Generator().manual_seed(0)
    scores = torch.randn(1, args.classes, size, size, generator=g)
    image = torch.rand(1, 3, size, size, generator=g) * 255
    dims = torch.tensor([float(size)] * 2).reshape(1, 2, 1, 1)
    pos = pixel_features(size, size, 3.0)
    bil = pixel_features(size, size, 121.0, image[0], 5.0)
    lat_pos = timed("lattice, positional (d = 2)", lambda: Permutohedral(pos))
    lat_bil = timed("lattice, bilateral (d = 5)", lambda: Permutohedral(bil))
    print(f"  vertices: {lat_pos.size} and {lat_bil.size} for {size * size} pixels")
    q = torch.rand(size * size, args.classes, generator=g)
    timed(f"filter {args.classes} values, positional", lambda: lat_pos.filter(q))
    timed(f"filter {args.classes} values, bilateral", lambda: lat_bil.filter(q))
    lp = read_net(f'layer {{ name: "crf" type: "DenseCRF" bottom: "u" bottom: "d" bottom: "i" top: "q" '
                  f'dense_crf_param {{ max_iter: {args.iterations} pos_w: 3 pos_xy_std: 3 bi_w: 4 '
                  f'bi_xy_std: 121 bi_rgb_std: 5 }} }}').layer[0]
    ctx = BuildContext(name="crf", type="DenseCRF", phase="TEST",
                       bottom_shapes=[tuple(scores.shape), tuple(dims.shape), tuple(image.shape)],
                       bottom_names=list(lp.bottom), top_names=list(lp.top))
    layer = layer_class("DenseCRF").from_proto(lp, ctx)
    timed(f"DenseCRF layer 1x{args.classes}x{size}x{size}, {args.iterations} it.",
          lambda: layer(scores, dims, image))


if __name__ == "__main__":
    main()
