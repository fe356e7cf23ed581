"""Our forward vs OpenCV dnn's on the same Caffe files (prototxt + caffemodel), CPU.

    python bench/vs_opencv.py                          # every net, 1 and 2 threads
    python bench/vs_opencv.py --nets rnet onet --threads 1 --repeat 30
    python bench/vs_opencv.py --quick                  # few repeats (smoke run)
    python bench/vs_opencv.py --list                   # the nets and their inputs

Nets: the BVLC reference nets of the reference material (../shared/reference/bvlc or
$SEGAWARE_SHARED/reference/bvlc; the ImageNet deploy nets at batch 1, their files declare the 10
oversampled crops) and nets this script writes itself in the shapes of common released Caffe models:
a ResNet-50 with BatchNorm+Scale at half width (open_nsfw), the three MTCNN PReLU nets (PNet on one
240x320 pyramid level, RNet 24x24 batch 16, ONet 48x48 batch 8), an SSD res10-style face detector at
300x300 (BatchNorm/Scale/ReLU backbone, loc/conf heads, Permute, Flatten, PriorBox, softmax; without
DetectionOutput, whose top-k selection would turn float32 rounding into different rows), and an
FCN-style VGG head on a small trunk, on a 500x400 (width x height) image, with a bilinear
Deconvolution and a Crop.

Weights are random (BatchNorm statistics with a stored scale factor other than 1, Scale near 1,
PReLU slopes in [0.05, 0.3], bilinear fillers kept) and every Convolution/InnerProduct is rescaled
so that its output has unit std on the benchmark's input (a softmax that saturated to exact 0/1
would compare equal whatever the implementations compute), written as a .caffemodel with our
writer and read by both. Per net and thread count one subprocess (so
torch's and OpenCV's thread pools start with that count and nothing else ran in that process) builds
both nets, times the first build (sc.Net with the weights vs cv2.dnn.readNetFromCaffe) and the
first forward, warms up, then alternates ours, OpenCV, ours, ... and prints the medians. Ours is
sc.Net(phase="test") under torch.no_grad(); OpenCV is the DNN_BACKEND_OPENCV CPU target, timed with
setInput + forward. The outputs of the last runs are compared: max|ours - opencv| over max|opencv|
of the worst net output; above 1e-4 the row is marked and the script exits with status 1 after
the table. The load column is the 1-minute load average when the row finished.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGAWARE_SHARED", REPO.parent / "shared"))
BVLC = SHARED / "reference" / "bvlc"
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------- prototxt writer
class Proto:
    """A small prototxt writer: each method appends one layer and returns its top."""

    def __init__(self, name):
        self.parts = [f'name: "{name}"']

    def layer(self, name, type_, bottoms, tops, body=""):
        lines = [f'layer {{ name: "{name}" type: "{type_}"']
        lines += [f'  bottom: "{b}"' for b in bottoms]
        lines += [f'  top: "{t}"' for t in tops]
        if body:
            lines.append("  " + body)
        self.parts.append("\n".join(lines) + " }")
        return tops[0] if tops else None

    def text(self):
        return "\n".join(self.parts) + "\n"

    def input(self, name, shape):
        dims = " ".join(f"dim: {d}" for d in shape)
        return self.layer(name, "Input", [], [name], f"input_param {{ shape {{ {dims} }} }}")

    def conv(self, name, bottom, num, kernel, stride=1, pad=0, group=1, bias=True, dilation=1,
             top=None):
        body = f"convolution_param {{ num_output: {num} kernel_size: {kernel}"
        body += f" stride: {stride}" if stride != 1 else ""
        body += f" pad: {pad}" if pad else ""
        body += f" group: {group}" if group != 1 else ""
        body += f" dilation: {dilation}" if dilation != 1 else ""
        body += " bias_term: false" if not bias else ""
        return self.layer(name, "Convolution", [bottom], [top or name], body + " }")

    def deconv_bilinear(self, name, bottom, channels, factor):
        kernel = 2 * factor - factor % 2
        body = (f"param {{ lr_mult: 0 }} convolution_param {{ num_output: {channels} "
                f"kernel_size: {kernel} stride: {factor} group: {channels} bias_term: false "
                f'weight_filler {{ type: "bilinear" }} }}')
        return self.layer(name, "Deconvolution", [bottom], [name], body)

    def bn_scale(self, name, bottom, scale_name=None):
        """BatchNorm (fixed statistics) and Scale with bias, both in place on `bottom`."""
        self.layer(name, "BatchNorm", [bottom], [bottom],
                   "batch_norm_param { use_global_stats: true }")
        return self.layer(scale_name or name.replace("bn", "scale"), "Scale", [bottom], [bottom],
                          "scale_param { bias_term: true }")

    def relu(self, name, bottom, top=None):
        return self.layer(name, "ReLU", [bottom], [top or bottom])

    def prelu(self, name, bottom):
        return self.layer(name, "PReLU", [bottom], [bottom])

    def pool(self, name, bottom, kernel, stride, method="MAX", pad=0, global_=False):
        if global_:
            body = f"pooling_param {{ pool: {method} global_pooling: true }}"
        else:
            body = f"pooling_param {{ pool: {method} kernel_size: {kernel} stride: {stride}"
            body += f" pad: {pad} }}" if pad else " }"
        return self.layer(name, "Pooling", [bottom], [name], body)

    def ip(self, name, bottom, num):
        return self.layer(name, "InnerProduct", [bottom], [name],
                          f"inner_product_param {{ num_output: {num} }}")

    def dropout(self, name, bottom, ratio=0.5):
        return self.layer(name, "Dropout", [bottom], [bottom], f"dropout_param {{ dropout_ratio: {ratio} }}")

    def softmax(self, name, bottom, axis=1):
        return self.layer(name, "Softmax", [bottom], [name],
                          f"softmax_param {{ axis: {axis} }}" if axis != 1 else "")

    def eltwise_sum(self, name, bottoms):
        return self.layer(name, "Eltwise", bottoms, [name], "eltwise_param { operation: SUM }")


# ------------------------------------------------------------------------------- generated nets
def resnet50_nsfw():
    """ResNet-50 at half width with BatchNorm+Scale after every convolution (open_nsfw)."""
    p = Proto("resnet50_1by2")
    x = p.input("data", (1, 3, 224, 224))
    x = p.conv("conv_1", x, 64, 7, stride=2, pad=3)
    p.bn_scale("bn_1", x, "scale_1")
    p.relu("relu_1", x)
    x = p.pool("pool1", x, 3, 2)
    for stage, (width, blocks) in enumerate(((32, 3), (64, 4), (128, 6), (256, 3))):
        for block in range(blocks):
            tag = f"stage{stage}_block{block}"
            stride = 2 if block == 0 and stage > 0 else 1
            if block == 0:
                shortcut = p.conv(f"conv_{tag}_proj_shortcut", x, 4 * width, 1, stride=stride)
                p.bn_scale(f"bn_{tag}_proj_shortcut", shortcut, f"scale_{tag}_proj_shortcut")
            else:
                shortcut = x
            y = p.conv(f"conv_{tag}_branch2a", x, width, 1, stride=stride)
            p.bn_scale(f"bn_{tag}_branch2a", y, f"scale_{tag}_branch2a")
            p.relu(f"relu_{tag}_branch2a", y)
            y = p.conv(f"conv_{tag}_branch2b", y, width, 3, pad=1)
            p.bn_scale(f"bn_{tag}_branch2b", y, f"scale_{tag}_branch2b")
            p.relu(f"relu_{tag}_branch2b", y)
            y = p.conv(f"conv_{tag}_branch2c", y, 4 * width, 1)
            p.bn_scale(f"bn_{tag}_branch2c", y, f"scale_{tag}_branch2c")
            x = p.eltwise_sum(f"eltwise_{tag}", [shortcut, y])
            p.relu(f"relu_{tag}", x)
    x = p.pool("pool", x, 7, 1, method="AVE")
    x = p.ip("fc_nsfw", x, 2)
    p.softmax("prob", x)
    return p.text()


def mtcnn_pnet():
    """MTCNN det1, fully convolutional, on one 240x320 pyramid level."""
    p = Proto("PNet")
    x = p.input("data", (1, 3, 240, 320))
    for i, num in enumerate((10, 16, 32), 1):
        x = p.conv(f"conv{i}", x, num, 3)
        p.prelu(f"PReLU{i}", x)
        if i == 1:
            x = p.pool("pool1", x, 2, 2)
    score = p.conv("conv4-1", x, 2, 1)
    p.conv("conv4-2", x, 4, 1)
    p.softmax("prob1", score)
    return p.text()


def mtcnn_rnet():
    """MTCNN det2: 24x24 candidate windows, batch 16."""
    p = Proto("RNet")
    x = p.input("data", (16, 3, 24, 24))
    x = p.conv("conv1", x, 28, 3)
    p.prelu("prelu1", x)
    x = p.pool("pool1", x, 3, 2)
    x = p.conv("conv2", x, 48, 3)
    p.prelu("prelu2", x)
    x = p.pool("pool2", x, 3, 2)
    x = p.conv("conv3", x, 64, 2)
    p.prelu("prelu3", x)
    x = p.ip("conv4", x, 128)
    p.prelu("prelu4", x)
    score = p.ip("conv5-1", x, 2)
    p.ip("conv5-2", x, 4)
    p.softmax("prob1", score)
    return p.text()


def mtcnn_onet():
    """MTCNN det3: 48x48 candidate windows, batch 8."""
    p = Proto("ONet")
    x = p.input("data", (8, 3, 48, 48))
    for i, num in enumerate((32, 64, 64), 1):
        x = p.conv(f"conv{i}", x, num, 3)
        p.prelu(f"prelu{i}", x)
        x = p.pool(f"pool{i}", x, 3 if i < 3 else 2, 2)
    x = p.conv("conv4", x, 128, 2)
    p.prelu("prelu4", x)
    x = p.ip("conv5", x, 256)
    p.dropout("drop5", x, 0.25)
    p.prelu("prelu5", x)
    score = p.ip("conv6-1", x, 2)
    p.ip("conv6-2", x, 4)
    p.ip("conv6-3", x, 10)
    p.softmax("prob1", score)
    return p.text()


def ssd_res10():
    """SSD face detector in the shape of res10_300x300: a pre-activation ResNet-10 (BatchNorm +
    Scale + ReLU), extra layers, and loc/conf heads with PriorBox on six feature maps."""
    p = Proto("res10_300x300_ssd")
    x = p.input("data", (1, 3, 300, 300))
    p.layer("data_bn", "BatchNorm", [x], ["data_bn"], "batch_norm_param { use_global_stats: true }")
    p.layer("data_scale", "Scale", ["data_bn"], ["data_bn"], "scale_param { bias_term: true }")
    x = p.conv("conv1_h", "data_bn", 32, 7, stride=2, pad=3)
    p.bn_scale("conv1_bn_h", x, "conv1_scale_h")
    p.relu("conv1_relu", x)
    x = p.pool("conv1_pool", x, 3, 2)
    y = p.conv("layer_64_1_conv1_h", x, 32, 3, pad=1)
    p.bn_scale("layer_64_1_bn2_h", y, "layer_64_1_scale2_h")
    p.relu("layer_64_1_relu2", y)
    y = p.conv("layer_64_1_conv2_h", y, 32, 3, pad=1)
    x = p.eltwise_sum("layer_64_1_sum", [y, x])
    sources = []
    for width, stride in ((128, 2), (256, 2), (512, 1)):
        tag = f"layer_{width}_1"
        p.layer(f"{tag}_bn1_h", "BatchNorm", [x], [f"{tag}_bn1_h"],
                "batch_norm_param { use_global_stats: true }")
        pre = p.layer(f"{tag}_scale1_h", "Scale", [f"{tag}_bn1_h"], [f"{tag}_bn1_h"],
                      "scale_param { bias_term: true }")
        pre = p.relu(f"{tag}_relu1", pre)
        if width == 256:
            sources.append(pre)                              # 38x38
        y = p.conv(f"{tag}_conv1_h", pre, width, 3, stride=stride, pad=1)
        p.bn_scale(f"{tag}_bn2_h", y, f"{tag}_scale2_h")
        p.relu(f"{tag}_relu2", y)
        y = p.conv(f"{tag}_conv2_h", y, width, 3, pad=1)
        shortcut = p.conv(f"{tag}_conv_expand_h", pre, width, 1, stride=stride)
        x = p.eltwise_sum(f"{tag}_sum", [y, shortcut])
    p.layer("last_bn_h", "BatchNorm", [x], ["last_bn_h"], "batch_norm_param { use_global_stats: true }")
    x = p.layer("last_scale_h", "Scale", ["last_bn_h"], ["last_bn_h"], "scale_param { bias_term: true }")
    x = p.relu("last_relu", x)
    sources.append(x)                                        # 19x19
    for i, (squeeze, width, stride, pad) in enumerate(((128, 256, 2, 1), (64, 128, 2, 1),
                                                       (64, 128, 1, 0), (64, 128, 1, 0)), 6):
        x = p.conv(f"conv{i}_1_h", x, squeeze, 1)
        p.relu(f"conv{i}_1_relu", x)
        x = p.conv(f"conv{i}_2_h", x, width, 3, stride=stride, pad=pad)
        p.relu(f"conv{i}_2_relu", x)
        sources.append(x)                                    # 10, 5, 3, 1
    sizes = ((30, 60), (60, 111), (111, 162), (162, 213), (213, 264), (264, 315))
    steps = (8, 16, 32, 64, 100, 300)
    locs, confs, priors = [], [], []
    for src, (min_size, max_size), step in zip(sources, sizes, steps):
        ratios = "aspect_ratio: 2" if step in (8, 100, 300) else "aspect_ratio: 2 aspect_ratio: 3"
        num_priors = 4 if step in (8, 100, 300) else 6
        for kind, per, out in (("loc", 4, locs), ("conf", 2, confs)):
            head = p.conv(f"{src}_mbox_{kind}", src, num_priors * per, 3, pad=1)
            perm = p.layer(f"{head}_perm", "Permute", [head], [f"{head}_perm"],
                           "permute_param { order: 0 order: 2 order: 3 order: 1 }")
            out.append(p.layer(f"{head}_flat", "Flatten", [perm], [f"{head}_flat"],
                               "flatten_param { axis: 1 }"))
        priors.append(p.layer(
            f"{src}_mbox_priorbox", "PriorBox", [src, "data"], [f"{src}_mbox_priorbox"],
            f"prior_box_param {{ min_size: {min_size} max_size: {max_size} {ratios} flip: true "
            f"clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: {step} "
            f"offset: 0.5 }}"))
    p.layer("mbox_loc", "Concat", locs, ["mbox_loc"], "concat_param { axis: 1 }")
    p.layer("mbox_conf", "Concat", confs, ["mbox_conf"], "concat_param { axis: 1 }")
    p.layer("mbox_priorbox", "Concat", priors, ["mbox_priorbox"], "concat_param { axis: 2 }")
    p.layer("mbox_conf_reshape", "Reshape", ["mbox_conf"], ["mbox_conf_reshape"],
            "reshape_param { shape { dim: 0 dim: -1 dim: 2 } }")
    p.softmax("mbox_conf_softmax", "mbox_conf_reshape", axis=2)
    p.layer("mbox_conf_flatten", "Flatten", ["mbox_conf_softmax"], ["mbox_conf_flatten"],
            "flatten_param { axis: 1 }")
    return p.text()


def fcn_small():
    """FCN-style: a small VGG-like trunk (three conv pairs + max pooling, stride 8), the VGG head
    as convolutions (fc6 7x7, fc7 1x1, dropout), a 21-class score, a bilinear x8 Deconvolution and
    a Crop back to the 500x400 (width x height) input."""
    p = Proto("fcn_small")
    data = x = p.input("data", (1, 3, 400, 500))
    for block, width in enumerate((16, 32, 64), 1):
        for i in (1, 2):
            x = p.conv(f"conv{block}_{i}", x, width, 3, pad=1)
            p.relu(f"relu{block}_{i}", x)
        x = p.pool(f"pool{block}", x, 2, 2)
    x = p.conv("fc6", x, 256, 7, pad=3)
    p.relu("relu6", x)
    p.dropout("drop6", x)
    x = p.conv("fc7", x, 256, 1)
    p.relu("relu7", x)
    p.dropout("drop7", x)
    x = p.conv("score_fr", x, 21, 1)
    x = p.deconv_bilinear("upscore", x, 21, 8)
    p.layer("score", "Crop", [x, data], ["score"], "crop_param { axis: 2 offset: 4 }")
    return p.text()


GENERATED = {
    "resnet50_nsfw": resnet50_nsfw,
    "pnet": mtcnn_pnet,
    "rnet": mtcnn_rnet,
    "onet": mtcnn_onet,
    "ssd_res10": ssd_res10,
    "fcn_500x400": fcn_small,
}
# name -> (file under the reference material's bvlc/, batch to run it at or None for the declared)
REFERENCE_NETS = {
    "alexnet": ("bvlc_alexnet_deploy.prototxt", 1),
    "caffenet": ("bvlc_reference_caffenet_deploy.prototxt", 1),
    "googlenet": ("bvlc_googlenet_deploy.prototxt", 1),
    "lenet": ("mnist_lenet.prototxt", None),
    "cifar10_quick": ("cifar10_cifar10_quick.prototxt", None),
    "caffenet_full_conv": ("net_surgery_bvlc_caffenet_full_conv.prototxt", None),
}
ALL_NETS = list(REFERENCE_NETS) + list(GENERATED)


# ---------------------------------------------------------------------------------- preparation
def prototxt_text(name):
    """The net's prototxt text (reference nets with their batch set)."""
    if name in GENERATED:
        return GENERATED[name]()
    file, batch = REFERENCE_NETS[name]
    path = BVLC / file
    if not path.is_file():
        raise SystemExit(f"{name}: {path} not found (the BVLC reference nets live in the reference "
                         f"material; set SEGAWARE_SHARED to the folder holding reference/)")
    if batch is None:
        return path.read_text()
    from google.protobuf import text_format
    from segaware_caffe import caffe_proto
    net = caffe_proto.read_net(path)
    inputs = [lp for lp in net.layer if lp.type == "Input"]
    if len(net.input_shape):
        shapes = list(net.input_shape)
    elif inputs:
        shapes = [s for lp in inputs for s in lp.input_param.shape]
    else:
        raise SystemExit(f"{name}: {path} declares no input shape to set the batch of")
    for shape in shapes:
        shape.dim[0] = batch
    return text_format.MessageToString(net)


def randomize_weights(net, seed):
    """Random blobs for a built Net: plausible magnitudes, so that every layer's output is neither
    saturated nor vanishing and differences between implementations stay visible."""
    import torch
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    with torch.no_grad():
        for record in net.records:
            blobs = record.module.caffe_blobs()
            if not blobs:
                continue
            kind = record.type
            if kind in ("Convolution", "InnerProduct", "NormConv", "Deconvolution"):
                weight = blobs[0]
                if kind == "Deconvolution" and record.param.convolution_param.HasField("weight_filler"):
                    pass                           # keep the declared filler (bilinear upsampling)
                else:
                    axis = 1 if kind == "Deconvolution" else 0
                    fan_in = weight.numel() // weight.shape[axis]
                    weight.copy_(normal(weight.shape, (2.0 / fan_in) ** 0.5))
                for bias in blobs[1:]:
                    bias.copy_(normal(bias.shape, 0.05))
            elif kind == "BatchNorm":
                factor = float(uniform((), 0.5, 2.0))
                mean, var = normal(blobs[0].shape, 0.1), uniform(blobs[1].shape, 0.5, 1.5)
                blobs[0].copy_(mean * factor)
                blobs[1].copy_(var * factor)
                blobs[2].fill_(factor)
            elif kind == "Scale":
                blobs[0].copy_(uniform(blobs[0].shape, 0.8, 1.2))
                for bias in blobs[1:]:
                    bias.copy_(normal(bias.shape, 0.1))
            elif kind == "PReLU":
                blobs[0].copy_(uniform(blobs[0].shape, 0.05, 0.3))
            else:
                for blob in blobs:
                    blob.copy_(normal(blob.shape, 0.1))


def calibrate(net, inputs):
    """Rescale every Convolution/InnerProduct (weights and bias) so that its output has unit
    standard deviation on `inputs`, in one forward pass (each layer sees the already rescaled
    layers before it). Random BatchNorm statistics do not normalise anything, so without this the
    activations of a deep net grow or shrink geometrically and a softmax saturates to exact 0/1,
    which would hide any difference between implementations."""
    import torch
    calls = []

    def rescale(module, args, output):
        if not isinstance(output, torch.Tensor):
            return None
        std = float(output.detach().double().std())
        if not std > 0:
            return None
        with torch.no_grad():
            for blob in module.caffe_blobs():
                blob.div_(std)
        calls.append(module)
        return output.detach() / std

    handles = [record.module.register_forward_hook(rescale) for record in net.records
               if record.type in ("Convolution", "InnerProduct")]
    try:
        # the exact (training-capable) path calls every layer module, so the hooks see them all
        with torch.enable_grad():
            net.forward(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if handles and not calls:
        raise RuntimeError(f"net {net.name}: no Convolution/InnerProduct module was called during "
                           f"the calibration forward (the forward no longer calls layer modules?)")


def net_inputs(net, name):
    """The benchmark's input arrays of a net: standard normal, seeded by the net's name."""
    import numpy as np
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return {blob: rng.standard_normal(shape).astype(np.float32)
            for blob, shape in net.input_shapes.items()}


def prepare(name, workdir):
    """Write <name>.prototxt and <name>.caffemodel (random weights, our writer) into workdir."""
    import segaware_caffe as sc
    proto = Path(workdir) / f"{name}.prototxt"
    model = Path(workdir) / f"{name}.caffemodel"
    proto.write_text(prototxt_text(name))
    net = sc.Net(proto, phase="test")
    randomize_weights(net, zlib.crc32(name.encode()))
    import torch
    calibrate(net, {k: torch.from_numpy(v) for k, v in net_inputs(net, name).items()})
    net.save_weights(model, overwrite=True)
    return proto, model


# ---------------------------------------------------------------------------------- child
def _cv_output_names(net):
    """OpenCV asks for outputs by layer name: the last layer that wrote each of our net outputs."""
    writer = {}
    for record in net.records:
        for i, top in enumerate(record.tops):
            writer[top] = (record.name, i)
    names = []
    for blob in net.outputs:
        layer, index = writer[blob]
        if index:
            raise SystemExit(f"output {blob!r} is top {index} of layer {layer!r}: this benchmark "
                             f"only compares first tops (OpenCV names outputs by layer)")
        names.append(layer)
    return names


def relative_difference(ours, theirs):
    """Worst over the outputs of max|ours - theirs| / max|theirs| (and which output); a shape
    mismatch is an infinite difference."""
    import numpy as np
    worst, where = 0.0, None
    for name in theirs:
        a, b = np.asarray(ours[name], dtype=np.float64), np.asarray(theirs[name], dtype=np.float64)
        if a.size != b.size:
            return float("inf"), f"{name} (shape {a.shape} vs {b.shape})"
        a = a.reshape(b.shape)
        scale = np.abs(b).max() if b.size else 0.0
        diff = np.abs(a - b).max() / (scale if scale > 0 else 1.0) if b.size else 0.0
        if not np.isfinite(diff) or diff > worst or where is None:
            worst, where = float(diff), name
    return worst, where


def child(args):
    threads = args.threads[0]
    t0 = time.perf_counter()
    import torch
    import segaware_caffe as sc
    sc.Net                                       # loads the layer registry (an import cost)
    t1 = time.perf_counter()
    import cv2
    t2 = time.perf_counter()
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)

    t = time.perf_counter()
    ours = sc.Net(args.proto, weights=args.model, phase="test")
    build_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = cv2.dnn.readNetFromCaffe(str(args.proto), str(args.model))
    build_cv = time.perf_counter() - t
    theirs.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    theirs.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    arrays = net_inputs(ours, args.net)
    tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
    blob_names = list(ours.outputs)
    layer_names = _cv_output_names(ours)

    def run_ours():
        with torch.no_grad():
            return ours.forward(**tensors)

    def run_cv():
        for name, a in arrays.items():
            theirs.setInput(a, name)
        return theirs.forward(layer_names)

    def timed(fn):
        t = time.perf_counter()
        result = fn()
        return (time.perf_counter() - t) * 1e3, result

    first_ours, _ = timed(run_ours)
    first_cv, _ = timed(run_cv)
    for _ in range(args.warmup):
        run_ours()
        run_cv()
    times_ours, times_cv = [], []
    for _ in range(args.repeat):
        ms, out_ours = timed(run_ours)
        times_ours.append(ms)
        ms, out_cv = timed(run_cv)
        times_cv.append(ms)
    ours_np = {blob: out_ours[blob].numpy() for blob in blob_names}
    cv_np = dict(zip(blob_names, out_cv))
    diff, worst = relative_difference(ours_np, cv_np)
    print(json.dumps({
        "ours_ms": statistics.median(times_ours), "cv_ms": statistics.median(times_cv),
        "build_ours_s": build_ours, "build_cv_s": build_cv,
        "first_ours_ms": first_ours, "first_cv_ms": first_cv,
        "import_ours_s": t1 - t0, "import_cv_s": t2 - t1,
        "diff": diff, "worst_output": worst, "load": os.getloadavg()[0],
    }))


# ---------------------------------------------------------------------------------- parent
def run_child(name, threads, files, args):
    proto, model = files
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--net", name,
           "--proto", str(proto), "--model", str(model), "--threads", str(threads),
           "--repeat", str(args.repeat), "--warmup", str(args.warmup)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return None, proc.stderr[-3000:] or proc.stdout[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


HEADER = (f"{'net':19} {'thr':>3} {'ours ms':>9} {'opencv ms':>9} {'ours/cv':>7} "
          f"{'build s':>7} {'cv build s':>10} {'1st ours ms':>11} {'1st cv ms':>9} "
          f"{'max diff':>8} {'load':>5}")


def format_row(name, threads, r):
    flag = "" if r["diff"] <= TOLERANCE else f"  <-- DISAGREE ({r['worst_output']})"
    return (f"{name:19} {threads:3d} {r['ours_ms']:9.2f} {r['cv_ms']:9.2f} "
            f"{r['ours_ms'] / r['cv_ms']:7.2f} {r['build_ours_s']:7.2f} {r['build_cv_s']:10.3f} "
            f"{r['first_ours_ms']:11.1f} {r['first_cv_ms']:9.1f} {r['diff']:8.1e} "
            f"{r['load']:5.2f}{flag}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=None, metavar="NET",
                        help=f"nets to run (default all: {' '.join(ALL_NETS)})")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs of each (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each after the first")
    parser.add_argument("--quick", action="store_true", help="2 timed runs, no warm-up (smoke run)")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"),
                        help="OMP_WAIT_POLICY for the timed processes (default: inherited)")
    parser.add_argument("--keep", metavar="DIR", help="write the nets and weights into DIR and keep them")
    parser.add_argument("--list", action="store_true", help="print the nets and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--net", help=argparse.SUPPRESS)
    parser.add_argument("--proto", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.nets is None:
        args.nets = list(ALL_NETS)
        if not BVLC.is_dir() and not args.list:
            print(f"skipping the BVLC reference nets: {BVLC} not found (set SEGAWARE_SHARED to the "
                  f"folder holding reference/)")
            args.nets = list(GENERATED)
    unknown = [n for n in args.nets if n not in ALL_NETS]
    if unknown:
        parser.error(f"unknown net {unknown[0]!r} (choose from {', '.join(ALL_NETS)})")
    if args.list:
        for name in ALL_NETS:
            if name in GENERATED:
                where = " ".join(GENERATED[name].__doc__.split()).split(". ")[0].rstrip(".")
            else:
                where = str(BVLC / REFERENCE_NETS[name][0])
            print(f"{name:19} {where}")
        return 0
    try:
        import cv2
    except ImportError:
        raise SystemExit("OpenCV is not installed: pip install 'segaware-caffe[bench]' "
                         "(opencv-python-headless<5, the last series that reads Caffe files)")
    import torch
    if args.quick:
        args.repeat, args.warmup = 2, 0
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"medians of {args.repeat} interleaved runs after {args.warmup} warm-up runs; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(HEADER, flush=True)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vs_opencv_"))
    workdir.mkdir(parents=True, exist_ok=True)
    failures, imports = [], []
    try:
        for name in args.nets:
            files = prepare(name, workdir)
            for threads in args.threads:
                result, error = run_child(name, threads, files, args)
                if result is None:
                    failures.append(f"{name} at {threads} thread(s) failed:\n{error}")
                    print(f"{name:19} {threads:3d}  FAILED (see below)", flush=True)
                    continue
                imports.append((result["import_ours_s"], result["import_cv_s"]))
                print(format_row(name, threads, result), flush=True)
                if not result["diff"] <= TOLERANCE:
                    failures.append(f"{name} at {threads} thread(s): outputs disagree, "
                                    f"max|ours - opencv| / max|opencv| = {result['diff']:.3g} on "
                                    f"{result['worst_output']} (tolerance {TOLERANCE:g})")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if imports:
        print(f"imports per process (median): torch + segaware_caffe "
              f"{statistics.median(i[0] for i in imports):.2f} s, "
              f"cv2 {statistics.median(i[1] for i in imports):.2f} s; "
              f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
