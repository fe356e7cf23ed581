"""How far our float32 forward of a released deploy net is from the same net in float64.

    python bench/float32_error.py                    # embs 321x321, vgg 161x161, res 129x129
    python bench/float32_error.py --nets res --size 257

The original is float32 too, so its numbers and ours each sit about this far from the exact
result; the figure says how much of the golden tolerance (|d| <= 1e-4 |ref| + 1e-5 max|ref|)
float32 summation order alone can use. Weights: convolutions N(0, 1/fan_in), biases N(0, 0.1),
BatchNorm statistics mean N(0, 0.1), variance U(0.5, 1.5) (the fillers' zeros would make every
BatchNorm divide by sqrt(eps)); inputs U(-128, 127).
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segaware_caffe import caffe_proto  # noqa: E402
import segaware_caffe as sc  # noqa: E402
from segaware_caffe.resize import resize_deploy  # noqa: E402
from tests.tolerances import ABSFRAC, REL  # noqa: E402  (the golden tolerance)

CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "segaware" / "config"
DEFAULT_SIZE = {"embs": 321, "vgg": 161, "res": 129}


def random_weights(net):
    with torch.no_grad():
        for r in net.records:
            blobs = r.module.caffe_blobs()
            if r.type == "BatchNorm":
                blobs[0].normal_(0, 0.1)
                blobs[1].uniform_(0.5, 1.5)
                blobs[2].fill_(1)
            elif r.type in ("Convolution", "Deconvolution", "InnerProduct"):
                blobs[0].normal_(0, blobs[0][0].numel() ** -0.5)
                if len(blobs) > 1:
                    blobs[1].normal_(0, 0.1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["embs", "vgg", "res"])
    parser.add_argument("--size", type=int, default=0, help="input size (0: per-net default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")   # NormConvMeanfield's quirky-default warnings
    print("net    blob                 shape                 max|ref|   max err/max|ref|  "
          "outside golden tol")
    for name in args.nets:
        size = args.size or DEFAULT_SIZE[name]
        net_param = resize_deploy(caffe_proto.read_net(CONFIG / name / "deploy.prototxt"), size)
        torch.manual_seed(0)
        single = sc.Net(net_param)
        double = sc.Net(net_param, dtype=torch.float64)
        random_weights(single)
        with torch.no_grad():
            for r32, r64 in zip(single.records, double.records):
                for a, b in zip(r32.module.caffe_blobs(), r64.module.caffe_blobs()):
                    b.copy_(a.double())
        torch.manual_seed(1)
        inputs = {k: torch.rand(s) * 255 - 128 for k, s in single.input_shapes.items()}
        with torch.no_grad():
            got = single.forward(**inputs)
            ref = double.forward(**{k: v.double() for k, v in inputs.items()})
        for blob in ref:
            x, y = got[blob].double(), ref[blob]
            scale = y.abs().max().item()
            err = (x - y).abs()
            outside = int((err > REL * y.abs() + ABSFRAC * scale).sum())
            relative = err.max().item() / scale if scale else err.max().item()
            print(f"{name:6s} {blob:20s} {str(tuple(y.shape)):20s} {scale:10.3g}   {relative:10.2e}"
                  f"        {outside}/{err.numel()}")


if __name__ == "__main__":
    main()
