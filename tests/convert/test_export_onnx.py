"""`segaware-caffe export --onnx`: nets run in onnxruntime with sc.Net's numbers, the
segmentation-aware layers (Im2dist, Im2parity, the masked convolution, Interp, NormConv,
NormConvMeanfield, NospConvMeanfield, DistLoss) included, in standard ONNX operators; what has
no ONNX form is refused, naming the layer.

The standard-operator twins (converters/onnx_ops.py) are first checked against the kernels in
float64 over many geometries; each layer then runs alone, exported, at random shapes and
parameters; then the golden layer nets and the released deploy nets."""
import itertools
import random
import re
import time

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import caffe_proto, kernels
from segaware_caffe.converters import onnx_ops
from segaware_caffe.converters.onnx_export import (NO_ONNX_FORM, export_onnx, onnx_refusals,
                                                   registered_forms)
from segaware_caffe.errors import OutputExistsError, UnsupportedError
from segaware_caffe.kernels.meanfield import MessageSpec, normconv_meanfield
from segaware_caffe.kernels.norm_conv import norm_conv
from segaware_caffe.resize import resize_deploy
from segaware_caffe.tools.cli import main
from tests.conftest import REFERENCE, reference_files
from tests.convert.test_export_python import GOLDEN_LAYERS, golden_case_net
from tests.net.test_released_configs import init_for_forward
from tests.tolerances import ONNX_MAXREL, max_relative_error, onnx_relative_error

BVLC = reference_files(sorted((REFERENCE / "bvlc").glob("*deploy*.prototxt"))
                       + [REFERENCE / "bvlc" / "mnist_lenet.prototxt"])
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def onnxruntime_or_skip():
    try:
        import onnxruntime
    except ImportError as e:
        pytest.skip(f"onnxruntime is not importable ({e}); pip install onnx onnxruntime")
    return onnxruntime


def session_for(path, threads=1):
    ort = onnxruntime_or_skip()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(result, inputs, threads=1):
    """{net blob: array} of what onnxruntime computes from `inputs` ({blob: tensor})."""
    session = session_for(result.path, threads)
    feed = {i.name: np.ascontiguousarray(inputs[i.name].numpy()) for i in session.get_inputs()}
    blob_of = {name: blob for blob, name in result.renamed.items()}
    values = session.run(result.outputs, feed)
    return {blob_of.get(name, name): value for name, value in zip(result.outputs, values)}


def check_net(net, inputs, tmp_path, what, limit=ONNX_MAXREL):
    """Export `net`, run it in onnxruntime and in sc.Net on `inputs`; returns the errors."""
    onnxruntime_or_skip()
    result = export_onnx(net, None, tmp_path / "net.onnx", verify_inputs=inputs)
    assert result.verified, result.unverified
    got = run_onnx(result, inputs)
    with torch.no_grad():
        ref = net.forward(outputs=list(got), **inputs)
    errors = {blob: onnx_relative_error(value, ref[blob]) for blob, value in got.items()}
    print(what, {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors, "nothing to compare"
    assert max(errors.values()) <= limit, errors
    return errors, got, ref


def net_of(text, **kwargs):
    return sc.Net(caffe_proto.read_net(text), **kwargs)


def input_layer(name, shape):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def geometry_text(kernel, pad, stride, dilation):
    return (f"kernel_h: {kernel[0]} kernel_w: {kernel[1]} pad_h: {pad[0]} pad_w: {pad[1]} "
            f"stride_h: {stride[0]} stride_w: {stride[1]} dilation: {dilation[0]} "
            f"dilation: {dilation[1]}")


def out_size(size, kernel, pad, stride, dilation):
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def random_geometries(seed, count, max_kernel=5):
    """(kernel, pad, stride, dilation, (N, C, H, W)) with a non-empty output, unequal h and w
    settings, batches of 1-2, odd sizes."""
    rng = random.Random(seed)
    found = []
    while len(found) < count:
        kernel = (rng.randint(1, max_kernel), rng.randint(1, max_kernel))
        pad = (rng.randint(0, 3), rng.randint(0, 3))
        stride = (rng.randint(1, 2), rng.randint(1, 2))
        dilation = (rng.randint(1, 3), rng.randint(1, 3))
        shape = (rng.randint(1, 2), rng.randint(1, 4), rng.randint(4, 11), rng.randint(4, 11))
        if min(out_size(s, k, p, st, d) for s, k, p, st, d in
               zip(shape[2:], kernel, pad, stride, dilation)) >= 1:
            found.append((kernel, pad, stride, dilation, shape))
    return found


# the settings the issue names explicitly, then random ones
GEOMETRIES = [((3, 3), (2, 2), (1, 1), (2, 2), (2, 3, 9, 8)),     # dilation 2
              ((3, 3), (1, 1), (2, 2), (1, 1), (1, 2, 9, 10)),    # stride 2
              ((5, 3), (2, 3), (2, 1), (1, 3), (2, 4, 11, 7)),    # unequal h / w
              ((1, 1), (0, 0), (1, 1), (1, 1), (1, 2, 5, 4))]     # one tap
GEOMETRIES += random_geometries(seed=14, count=4)
GEOMETRY_IDS = [f"k{g[0][0]}x{g[0][1]}p{g[1][0]}x{g[1][1]}s{g[2][0]}x{g[2][1]}d{g[3][0]}x{g[3][1]}"
                for g in GEOMETRIES]


# ------------------------------------------------------------------ the twins, without ONNX
def test_twins_match_the_kernels_over_many_geometries():
    """onnx_ops computes what the kernels compute (float64), removed taps exactly."""
    for (kernel, pad, stride, dilation, shape), norm, center, bounds in itertools.product(
            random_geometries(seed=3, count=25), ("L1", "L2"), (False, True), (False, True)):
        x = torch.randn(shape, dtype=torch.float64)
        ref = kernels.im2dist(x, kernel, pad, stride, dilation, norm, center, bounds)
        got = onnx_ops.im2dist(x, kernel, pad, stride, dilation, norm, center, bounds)
        where = (kernel, pad, stride, dilation, shape, norm, center, bounds)
        assert torch.equal(got == kernels.BIG, ref == kernels.BIG), where
        assert max_relative_error(torch.where(ref == kernels.BIG, 0, got),
                                  torch.where(ref == kernels.BIG, 0, ref)) <= 1e-12, where
    for kernel, pad, stride, dilation, shape in random_geometries(seed=4, count=25):
        labels = torch.randint(0, 4, shape).double()
        labels[labels == 3] = 255
        labels[..., 0] = 2.7           # truncated toward zero
        labels[..., -1, :] = -1.5
        for ignore in (None, 255, 2):
            assert torch.equal(onnx_ops.im2parity(labels, kernel, pad, stride, dilation, ignore),
                               kernels.im2parity(labels, kernel, pad, stride, dilation, ignore))
        group = 2 if shape[1] % 2 == 0 else 1
        weight = torch.randn(4, shape[1] // group, *kernel, dtype=torch.float64)
        bias = torch.randn(4, dtype=torch.float64)
        emb = torch.randn(shape[0], 3, *shape[2:], dtype=torch.float64)
        for bias_or_none in (bias, None):
            for norm in ("L1", "L2"):
                arguments = dict(emb=emb, lam=torch.tensor(0.3, dtype=torch.float64), pad=pad,
                                 stride=stride, dilation=dilation, group=group, norm=norm)
                x = torch.randn(shape, dtype=torch.float64)
                ref = kernels.masked_conv2d(x, weight, bias_or_none, **arguments)
                got = onnx_ops.masked_conv2d(x, weight, bias_or_none, **arguments)
                assert max_relative_error(got, ref) <= 1e-12
        scale = torch.tensor([0.4], dtype=torch.float64)
        for scale_term, center in ((True, True), (False, False)):
            arguments = dict(kernel_size=kernel, pad=pad, stride=stride, dilation=dilation,
                             group=group, remove_center=center, remove_bounds=not center,
                             scale_term=scale_term)
            x = torch.randn(shape, dtype=torch.float64)
            assert max_relative_error(onnx_ops.norm_conv(x, emb, weight, bias, scale, **arguments),
                                      norm_conv(x, emb, weight, bias, scale, **arguments)) <= 1e-12


@pytest.mark.parametrize("specs", [
    (MessageSpec(3, pad=2, dilation=2, scale=0.7), MessageSpec(5, pad=2, scale=1.5)),
    (MessageSpec(3, pad=3, dilation=1, scale=0.2, remove_center=False, remove_bounds=False),
     MessageSpec(1, pad=0, scale=2.0)),                      # a message grid larger than H x W
    (MessageSpec(3, pad=1, dilation=0), MessageSpec(5, pad=4, dilation=2, scale=30.0)),
], ids=["aligned", "misaligned-grid", "dilation0-and-large-scale"])
def test_meanfield_twins_match_the_kernels(specs):
    bilateral, spatial = specs
    gen = torch.Generator().manual_seed(5)
    unary, q0 = (torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    feats = (torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64),
             torch.randn(2, 2, 7, 6, generator=gen, dtype=torch.float64))
    blobs = [torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    ref = normconv_meanfield(unary, q0, *feats, *blobs, num_iterations=3, bilateral=bilateral,
                             spatial=spatial)
    got = onnx_ops.normconv_meanfield(unary, q0, *feats, *blobs, num_iterations=3,
                                      bilateral=bilateral, spatial=spatial)
    assert max_relative_error(got, ref) <= 1e-12


def test_twin_helpers():
    x = torch.tensor([[-2.5, -0.5, 0.0], [0.5, 2.5, 3.0]])
    assert torch.equal(onnx_ops.trunc(x), torch.trunc(x))
    y = onnx_ops.zero_first_element(torch.full((2, 3), float("inf")))
    assert y[0, 0] == 0 and torch.isinf(y.view(-1)[1:]).all()
    dist, parity = torch.rand(2, 9, 4, 5) * 3, torch.randint(0, 2, (2, 9, 4, 5)).float()
    parity[0, 0] = 255
    for ignore in (None, 255):
        assert max_relative_error(onnx_ops.dist_loss(dist, parity, 0.5, 2.0, ignore),
                                  kernels.dist_loss(dist, parity, 0.5, 2.0, ignore)) <= 1e-6
    with pytest.raises(ValueError, match="norm must be one of"):
        onnx_ops.im2dist(dist, 3, norm="L3")
    with pytest.raises(ValueError, match="give exactly one of emb"):
        onnx_ops.masked_conv2d(dist, torch.zeros(1, 9, 1, 1))


# ------------------------------------------------------------------ each layer alone, in ONNX
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_im2dist_and_im2parity_alone(geometry, tmp_path):
    kernel, pad, stride, dilation, shape = geometry
    conv = geometry_text(kernel, pad, stride, dilation)
    index = GEOMETRIES.index(geometry)
    norm, center, bounds = ("L1", "L2")[index % 2], index % 3 != 1, index % 4 in (0, 3)
    labels_shape = (shape[0], 2, *shape[2:])
    text = (input_layer("x", shape) + input_layer("labels", labels_shape)
            + f'layer {{ name: "d" type: "Im2dist" bottom: "x" top: "d" convolution_param {{ {conv} }} '
              f'im2dist_param {{ norm: {norm} remove_center: {str(center).lower()} '
              f'remove_bounds: {str(bounds).lower()} }} }}\n'
            + f'layer {{ name: "p" type: "Im2parity" bottom: "labels" top: "p" '
              f'convolution_param {{ {conv} }} im2parity_param {{ ignore_label: 255 }} }}\n'
            + f'layer {{ name: "q" type: "Im2parity" bottom: "labels" top: "q" '
              f'convolution_param {{ {conv} }} }}\n')
    net = net_of(text)
    gen = torch.Generator().manual_seed(index)
    labels = torch.randint(0, 3, labels_shape, generator=gen).float()
    labels[:, :, 0, 0] = 255
    labels[:, -1, -1, :] = 1.9            # truncated to 1
    inputs = {"x": torch.randn(shape, generator=gen) * 3, "labels": labels}
    errors, got, ref = check_net(net, inputs, tmp_path, f"{GEOMETRY_IDS[index]} {norm} "
                                 f"remove_center={center} remove_bounds={bounds}")
    assert np.array_equal(got["p"], ref["p"].numpy()) and np.array_equal(got["q"], ref["q"].numpy())
    if center or bounds:
        assert (ref["d"] == kernels.BIG).any() or kernel == (1, 1) and not center


MASKED_CONVS = [((3, 3), (1, 1), (1, 1), (1, 1), (2, 3, 9, 8), 1),
                ((3, 3), (2, 2), (1, 1), (2, 2), (1, 4, 9, 7), 2),     # dilation 2, 2 groups
                ((3, 5), (1, 2), (2, 2), (1, 1), (2, 3, 10, 11), 1)]   # stride 2


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", MASKED_CONVS, ids=["k3", "k3d2g2", "k3x5s2"])
def test_masked_convolution_alone(case, fuse, tmp_path):
    """The released pattern (Im2dist -> Scale -> AbsVal -> Exp -> Tile, Im2col, PROD,
    Convolution on columns), fused by the Net into one masked convolution or left as layers."""
    kernel, pad, stride, dilation, shape, group = case
    conv = geometry_text(kernel, pad, stride, dilation)
    channels = shape[1]
    text = (input_layer("x", shape) + input_layer("emb", (shape[0], 5, *shape[2:]))
            + f'layer {{ name: "dist" type: "Im2dist" bottom: "emb" top: "dist" '
              f'convolution_param {{ {conv} }} im2dist_param {{ norm: L1 }} }}\n'
            + 'layer { name: "lam" type: "Scale" bottom: "dist" top: "lam" scale_param { num_axes: 0 '
              'bias_term: false filler { type: "constant" value: -0.3 } } }\n'
            + 'layer { name: "abs" type: "AbsVal" bottom: "lam" top: "abs" }\n'
            + 'layer { name: "mask" type: "Exp" bottom: "abs" top: "mask" exp_param { scale: -1 } }\n'
            + f'layer {{ name: "tile" type: "Tile" bottom: "mask" top: "tiled" tile_param {{ axis: 1 '
              f'tiles: {channels} }} }}\n'
            + f'layer {{ name: "cols" type: "Im2col" bottom: "x" top: "cols" convolution_param {{ {conv} }} }}\n'
            + 'layer { name: "hit" type: "Eltwise" bottom: "cols" bottom: "tiled" top: "hit" '
              'eltwise_param { operation: PROD } }\n'
            + f'layer {{ name: "conv" type: "Convolution" bottom: "hit" top: "y" convolution_param {{ '
              f'num_output: 4 group: {group} {conv} bottom_is_im2col: true '
              f'weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" }} }} }}\n')
    torch.manual_seed(0)
    net = net_of(text, fuse=fuse)
    assert len(net.fused_groups) == (1 if fuse else 0)
    gen = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(shape, generator=gen), "emb": torch.randn(shape[0], 5, *shape[2:],
                                                                         generator=gen)}
    check_net(net, inputs, tmp_path, f"masked conv {case} fuse={fuse}")


INTERPS = [("zoom_factor: 2", (1, 2, 5, 7)), ("shrink_factor: 2", (2, 3, 9, 8)),
           ("height: 7 width: 4", (1, 2, 4, 6)), ("shrink_factor: 3 zoom_factor: 2", (1, 2, 10, 7)),
           ("zoom_factor: 4 pad_beg: -1 pad_end: -2", (2, 1, 8, 9)),
           ("height: 5 width: 6", (1, 2, 5, 6)),                        # the size kept: a copy
           ("height: 1 width: 3", (1, 2, 6, 6)), ("height: 4 width: 5", (1, 2, 1, 1))]


@pytest.mark.parametrize("param, shape", INTERPS, ids=[p for p, _ in INTERPS])
def test_interp_alone(param, shape, tmp_path):
    text = input_layer("x", shape) + (f'layer {{ name: "i" type: "Interp" bottom: "x" top: "y" '
                                      f'interp_param {{ {param} }} }}\n')
    net = net_of(text)
    check_net(net, {"x": torch.randn(shape, generator=torch.Generator().manual_seed(2))}, tmp_path,
              f"Interp {param}")


MEANFIELDS = [
    # the released res CRF's kinds of settings, small: dilated bilateral, local spatial
    ("num_iterations: 3 kernel_size: 3 pad: 2 dilation: 2 scale: 0.7 "
     "kernel_size: 5 pad: 2 dilation: 1 scale: 1.5", (2, 3, 7, 8), (4, 2)),
    # no remove flags, a grid larger than H x W (read misaligned, as the original does)
    ("num_iterations: 2 remove_center: false remove_bounds: false remove_center: false "
     "remove_bounds: false kernel_size: 3 pad: 3 dilation: 1 scale: 0.4 "
     "kernel_size: 3 pad: 1 dilation: 1 scale: 2.0", (1, 4, 6, 5), (3, 3)),
    # the original's defaults for dilation and scale (0): every tap reads the centre
    ("num_iterations: 2 kernel_size: 3 pad: 1 kernel_size: 5 pad: 2", (1, 2, 5, 5), (5, 2)),
]


@pytest.mark.parametrize("param, shape, features", MEANFIELDS,
                         ids=["dilated", "misaligned", "dilation0"])
def test_normconv_meanfield_alone(param, shape, features, tmp_path):
    n, c, h, w = shape
    text = (input_layer("u", shape) + input_layer("q", shape)
            + input_layer("fb", (n, features[0], h, w)) + input_layer("fs", (n, features[1], h, w))
            + f'layer {{ name: "crf" type: "NormConvMeanfield" bottom: "u" bottom: "q" bottom: "fb" '
              f'bottom: "fs" top: "crf" norm_conv_meanfield_param {{ {param} }} }}\n')
    net = net_of(text)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():     # learned (non-identity) blobs
        for blob in net.records[-1].module.caffe_blobs():
            blob.copy_(torch.randn(blob.shape, generator=gen) * 0.5)
    inputs = {name: torch.randn(shape_, generator=gen) * 2
              for name, shape_ in net.input_shapes.items()}
    check_net(net, inputs, tmp_path, f"NormConvMeanfield {param}")


def test_nosp_conv_meanfield_and_norm_conv_alone(tmp_path):
    shape = (2, 3, 7, 6)
    text = (input_layer("u", shape) + input_layer("q", shape) + input_layer("f", (2, 4, 7, 6))
            + 'layer { name: "crf" type: "NospConvMeanfield" bottom: "u" bottom: "q" bottom: "f" '
              'top: "crf" norm_conv_meanfield_param { num_iterations: 3 kernel_size: 3 pad: 2 '
              'dilation: 2 scale: 0.8 } }\n'
            + 'layer { name: "nc" type: "NormConv" bottom: "u" bottom: "f" top: "nc" '
              'convolution_param { num_output: 6 group: 3 kernel_size: 3 pad: 2 stride: 2 dilation: 2 '
              'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } } '
              'norm_conv_param { norm: L1 remove_center: true scale_filler { type: "constant" value: 0.6 } } }\n'
            + 'layer { name: "nc2" type: "NormConv" bottom: "u" bottom: "f" top: "nc2" '
              'convolution_param { num_output: 2 kernel_size: 3 pad: 1 bias_term: false '
              'weight_filler { type: "gaussian" std: 0.5 } } norm_conv_param { scale_term: false '
              'remove_bounds: true } }\n')
    torch.manual_seed(4)
    net = net_of(text)
    gen = torch.Generator().manual_seed(4)
    inputs = {name: torch.randn(s, generator=gen) for name, s in net.input_shapes.items()}
    check_net(net, inputs, tmp_path, "NospConvMeanfield, NormConv")


def test_dist_loss_alone(tmp_path):
    """The embedding loss of the embs nets: Im2dist, Im2parity (ignore 255) and DistLoss."""
    text = (input_layer("emb", (2, 3, 8, 9)) + input_layer("labels", (2, 1, 8, 9))
            + 'layer { name: "d" type: "Im2dist" bottom: "emb" top: "d" convolution_param { '
              'kernel_size: 3 pad: 2 dilation: 2 } }\n'
            + 'layer { name: "p" type: "Im2parity" bottom: "labels" top: "p" convolution_param { '
              'kernel_size: 3 pad: 2 dilation: 2 } im2parity_param { ignore_label: 255 } }\n'
            + 'layer { name: "loss" type: "DistLoss" bottom: "d" bottom: "p" top: "loss" '
              'convolution_param { kernel_size: 3 } dist_loss_param { alpha: 0.5 beta: 2 '
              'ignore_label: 255 } }\n')
    net = net_of(text)
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (2, 1, 8, 9), generator=gen).float()
    labels[0, 0, :2] = 255
    errors, got, ref = check_net(net, {"emb": torch.randn(2, 3, 8, 9, generator=gen),
                                       "labels": labels}, tmp_path, "DistLoss")
    assert ref["loss"] > 0


def test_plain_layers_of_the_segaware_nets(tmp_path):
    """Tile (channels and space), Eltwise SUM with coefficients, PROD and MAX of three, Exp with
    a base, Power, AbsVal, Scale, Concat and Slice, as the released configs combine them."""
    text = (input_layer("x", (2, 3, 5, 6)) + input_layer("y", (2, 9, 5, 6))
            + 'layer { name: "e" type: "Exp" bottom: "x" top: "e" exp_param { base: 2 scale: 0.5 shift: 0.1 } }\n'
            + 'layer { name: "t" type: "Tile" bottom: "e" top: "t" tile_param { axis: 1 tiles: 3 } }\n'
            + 'layer { name: "s" type: "Eltwise" bottom: "t" bottom: "y" top: "s" eltwise_param { '
              'operation: SUM coeff: 0.5 coeff: -1.5 } }\n'
            + 'layer { name: "m" type: "Eltwise" bottom: "s" bottom: "y" bottom: "t" top: "m" '
              'eltwise_param { operation: MAX } }\n'
            + 'layer { name: "p" type: "Eltwise" bottom: "m" bottom: "y" top: "p" eltwise_param { operation: PROD } }\n'
            + 'layer { name: "a" type: "AbsVal" bottom: "p" top: "a" }\n'
            + 'layer { name: "w" type: "Power" bottom: "a" top: "w" power_param { power: 2 scale: 0.5 shift: 1 } }\n'
            + 'layer { name: "sc" type: "Scale" bottom: "w" top: "sc" scale_param { num_axes: 0 '
              'bias_term: true filler { type: "constant" value: -0.7 } bias_filler { type: "constant" value: 0.2 } } }\n'
            + 'layer { name: "ts" type: "Tile" bottom: "sc" top: "ts" tile_param { axis: 2 tiles: 2 } }\n'
            + 'layer { name: "sl" type: "Slice" bottom: "ts" top: "sl1" top: "sl2" slice_param { axis: 1 slice_point: 4 } }\n'
            + 'layer { name: "c" type: "Concat" bottom: "sl2" bottom: "sl1" top: "c" }\n')
    net = net_of(text)
    gen = torch.Generator().manual_seed(6)
    check_net(net, {"x": torch.randn(2, 3, 5, 6, generator=gen),
                    "y": torch.randn(2, 9, 5, 6, generator=gen)}, tmp_path, "plain layers")


@pytest.mark.parametrize("type_", ["DomainTransform", "DomainTransformForwardOnly"])
def test_domain_transform_alone(type_, tmp_path):
    """The valid sizes are data: the graph reads them (images smaller than the blob, fractional
    sizes truncated), it does not freeze the ones it was traced with."""
    text = (input_layer("x", (3, 2, 7, 9)) + input_layer("g", (3, 1, 7, 9))
            + input_layer("dims", (3, 2, 1, 1))
            + f'layer {{ name: "dt" type: "{type_}" bottom: "x" bottom: "g" bottom: "dims" top: "y" '
              f'domain_transform_param {{ num_iter: 2 spatial_sigma: 6 range_sigma: 3 '
              f'min_weight: 0.05 }} }}\n')
    net = net_of(text)
    gen = torch.Generator().manual_seed(7)
    x, g = torch.randn(3, 2, 7, 9, generator=gen), torch.rand(3, 1, 7, 9, generator=gen) * 4
    traced_with = {"x": x, "g": g, "dims": torch.tensor([[7, 9], [5, 6], [2.7, 8.5]]).reshape(3, 2, 1, 1)}
    check_net(net, traced_with, tmp_path, type_)
    result = export_onnx(net, None, tmp_path / "net.onnx", overwrite=True, verify=False)
    inputs = {"x": x, "g": g, "dims": torch.tensor([[3.0, 4], [7, 9], [0, 0]]).reshape(3, 2, 1, 1)}
    got = run_onnx(result, inputs)["y"]
    with torch.no_grad():
        ref = net.forward(**inputs)["y"]
    assert onnx_relative_error(got, ref) <= ONNX_MAXREL
    assert np.array_equal(got[2], x[2].numpy()) and not np.allclose(got[:2], x[:2].numpy())


def test_other_layers_the_tracer_needs_help_with(tmp_path):
    """ArgMax (ties: the higher index first), Pooling the emitter leaves to the layer (AVE with a
    pad beyond half the kernel), SPP (MAX and AVE levels), BiasChannel, SoftmaxWithLoss with its
    prob top: each has an ONNX form, and the symbolics added for the export are removed after."""
    from torch.onnx._internal.torchscript_exporter import registration
    text = (input_layer("x", (2, 4, 7, 9)) + input_layer("labels", (2, 1, 7, 9))
            + input_layer("present", (2, 3, 1, 1))
            + 'layer { name: "am" type: "ArgMax" bottom: "x" top: "am" argmax_param { top_k: 2 axis: 1 } }\n'
            + 'layer { name: "amv" type: "ArgMax" bottom: "x" top: "amv" argmax_param { top_k: 3 '
              'out_max_val: true } }\n'
            + 'layer { name: "ave" type: "Pooling" bottom: "x" top: "ave" pooling_param { pool: AVE '
              'kernel_size: 3 stride: 2 pad: 2 } }\n'
            + 'layer { name: "spp" type: "SPP" bottom: "x" top: "spp" spp_param { pool: AVE pyramid_height: 3 } }\n'
            + 'layer { name: "sppm" type: "SPP" bottom: "x" top: "sppm" spp_param { pool: MAX pyramid_height: 2 } }\n'
            + 'layer { name: "bc" type: "BiasChannel" bottom: "x" bottom: "present" top: "bc" '
              'bias_channel_param { bg_bias: 1 fg_bias: 3 ignore_label: 255 } }\n'
            + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "labels" top: "loss" '
              'top: "prob" loss_weight: 1 loss_weight: 0 loss_param { ignore_label: 255 normalization: VALID } }\n')
    net = net_of(text)
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(0, 3, (2, 4, 7, 9), generator=gen).float()     # many ties
    labels = torch.randint(0, 4, (2, 1, 7, 9), generator=gen).float()
    labels[0, 0, 0] = 255
    present = torch.tensor([[0.0, 2, 255], [3, -1, 1]]).reshape(2, 3, 1, 1)
    _, got, ref = check_net(net, {"x": x, "labels": labels, "present": present}, tmp_path,
                            "ArgMax, Pooling, SPP, BiasChannel, SoftmaxWithLoss")
    assert np.array_equal(got["am"], ref["am"].numpy())
    for name in ("aten::trunc", "aten::__iand_"):
        assert not registration.registry.is_registered_op(name, 17)


# ------------------------------------------------------------------ outputs, files, refusals
def test_outputs_named_like_inputs(tmp_path):
    """An input passed through unchanged (vgg deploy's `label`) is left out, and the input goes
    too when nothing else reads it; an output that rewrites an input in place keeps its values
    under another name (ONNX names each value once)."""
    text = (input_layer("x", (1, 2, 3, 3)) + input_layer("label", (1, 1, 3, 3))
            + input_layer("z", (1, 2, 3, 3))
            + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }\n'
            + 'layer { name: "s" type: "Eltwise" bottom: "x" bottom: "z" top: "s" }\n')
    net = net_of(text)
    assert set(net.outputs) == {"label", "s"}
    result = export_onnx(net, None, tmp_path / "a.onnx")
    assert result.left_out == ["label"] and result.inputs == ["x", "z"]
    assert result.outputs == ["s"] and result.renamed == {}
    text2 = input_layer("x", (1, 2, 3, 3)) + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }\n'
    net2 = net_of(text2)
    result2 = export_onnx(net2, None, tmp_path / "b.onnx")
    assert result2.renamed == {"x": "x_out"} and result2.outputs == ["x_out"]
    x = torch.randn(1, 2, 3, 3)
    got = run_onnx(result2, {"x": x})
    assert np.array_equal(got["x"], net2.forward(x=x)["x"].numpy())
    with pytest.raises(UnsupportedError, match="computes no output"):
        export_onnx(net_of(input_layer("x", (1, 2))), None, tmp_path / "c.onnx")


def test_existing_file_is_kept(tmp_path):
    net = net_of(input_layer("x", (1, 2, 4, 4))
                 + 'layer { name: "i" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 2 } }')
    path = tmp_path / "net.onnx"
    path.write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        export_onnx(net, None, path)
    assert path.read_bytes() == b"mine"
    export_onnx(net, None, path, overwrite=True)
    assert path.read_bytes() != b"mine"


def test_layers_without_an_onnx_form_are_refused_together(tmp_path):
    text = (input_layer("x", (1, 3, 5, 5)) + input_layer("dims", (1, 2, 1, 1))
            + input_layer("labels", (1, 1, 5, 5))
            + 'layer { name: "crf" type: "DenseCRF" bottom: "x" bottom: "dims" top: "crf" '
              'dense_crf_param { max_iter: 2 pos_w: 3 pos_xy_std: 3 } }\n'
            + 'layer { name: "noise" type: "DummyData" top: "noise" dummy_data_param { shape { '
              'dim: 1 dim: 3 dim: 5 dim: 5 } data_filler { type: "gaussian" } } }\n'
            + 'layer { name: "ones" type: "DummyData" top: "ones" dummy_data_param { shape { '
              'dim: 1 dim: 3 dim: 5 dim: 5 } data_filler { type: "constant" value: 1 } } }\n'
            + 'layer { name: "sum" type: "Eltwise" bottom: "noise" bottom: "ones" top: "sum" }\n'
            + 'layer { name: "ul" type: "UniqueLabel" bottom: "labels" top: "ul" unique_label_param { '
              'max_labels: 3 } }\n')
    net = net_of(text)
    assert [(n, t) for n, t, _ in onnx_refusals(net)] == [
        ("crf", "DenseCRF"), ("noise", "DummyData"), ("ul", "UniqueLabel")]
    path = tmp_path / "net.onnx"
    with pytest.raises(UnsupportedError, match=r"3 layer\(s\) have no ONNX form: crf \(DenseCRF\): "
                                               r"its permutohedral lattice.*noise \(DummyData\): its "
                                               r"gaussian filler draws new values.*ul \(UniqueLabel\)"):
        export_onnx(net, None, path)
    assert not path.exists()
    assert set(NO_ONNX_FORM) == {"AdaptiveBiasChannel", "DenseCRF", "UniqueLabel"}
    assert {"Im2dist", "Im2parity", "DistLoss", "NormConv", "NormConvMeanfield",
            "NospConvMeanfield", "DomainTransform", "DomainTransformForwardOnly"} <= set(registered_forms())


def test_random_draws_of_the_train_phase_are_refused(tmp_path):
    text = (input_layer("x", (1, 3, 6, 6))
            + 'layer { name: "drop" type: "Dropout" bottom: "x" top: "d" }\n'
            + 'layer { name: "sto" type: "Pooling" bottom: "x" top: "s" pooling_param { pool: STOCHASTIC '
              'kernel_size: 2 stride: 2 } }\n'
            + 'layer { name: "spp" type: "SPP" bottom: "x" top: "p" spp_param { pool: STOCHASTIC '
              'pyramid_height: 1 } }\n')
    refused = onnx_refusals(net_of(text, phase="train"))
    assert [(n, t) for n, t, _ in refused] == [("drop", "Dropout"), ("sto", "Pooling"),
                                               ("spp", "SPP")]
    assert "export the TEST phase" in refused[0][2]
    assert [n for n, _, _ in onnx_refusals(net_of(text, phase="test"))] == ["spp"]


def test_a_graph_that_differs_from_the_net_is_not_written(tmp_path, monkeypatch):
    """The check in onnxruntime catches what a trace silently froze (here: a twin that is wrong
    on purpose)."""
    onnxruntime_or_skip()
    from segaware_caffe.converters import onnx_export
    wrong = {**onnx_export.PORTABLE_FUNCTIONS,
             kernels.im2dist: lambda *a, **k: onnx_ops.im2dist(*a, **k) * 1.01}
    monkeypatch.setattr(onnx_export, "PORTABLE_FUNCTIONS", wrong)
    net = net_of(input_layer("x", (1, 2, 5, 5))
                 + 'layer { name: "d" type: "Im2dist" bottom: "x" top: "d" convolution_param { kernel_size: 3 } }')
    path = tmp_path / "net.onnx"
    with pytest.raises(UnsupportedError, match=r"onnxruntime does not reproduce the Net: d \(max "
                                               r"relative error 0.01\)"):
        export_onnx(net, None, path)
    assert not path.exists()
    assert not export_onnx(net, None, path, verify=False).verified


# ------------------------------------------------------------------ golden layer nets
# golden nets that are refused, and the layer each names
REFUSED = {"adaptive_bias_channel": "abc (AdaptiveBiasChannel)", "data_lmdb": "db (Data)", "densecrf": "crf (DenseCRF)", "flodata": "flo (FloData)",
           "hdf5data": "h5 (HDF5Data)", "hdf5output": "h5out (HDF5Output)",
           "memorydata": "mem (MemoryData)", "unique_label": "ul (UniqueLabel)",
           "windowdata": "win (WindowData)"}
# golden nets whose layers do not go through the tracer (the export says so, naming them); none
# is a segmentation-aware layer
NOT_TRACED = {"segaccuracy_ignore255": "SegAccuracy"}


@pytest.mark.slow
@pytest.mark.parametrize("meta_path", GOLDEN_LAYERS, ids=lambda p: p.parent.name)
def test_golden_layer_nets(meta_path, tmp_path, monkeypatch):
    onnxruntime_or_skip()
    case, meta, net = golden_case_net(meta_path, tmp_path, monkeypatch)
    if case.name in REFUSED:
        with pytest.raises(UnsupportedError, match=re.escape(f"no ONNX form: {REFUSED[case.name]}")):
            export_onnx(net, None, tmp_path / "net.onnx")
        return
    if case.name in NOT_TRACED:
        with pytest.raises(UnsupportedError, match=rf"\({NOT_TRACED[case.name]}\)|"
                                                   rf"onnxruntime does not reproduce the Net"):
            export_onnx(net, None, tmp_path / "net.onnx")
        return
    data = np.load(case / "data.npz")
    inputs = {name: torch.from_numpy(data["in/" + name].copy()) for name in net.input_names}
    check_net(net, inputs, tmp_path, case.name)


# ------------------------------------------------------------------ the released deploy nets
def deploy_net(reference, name, size):
    net_param = resize_deploy(caffe_proto.read_net(reference / f"segaware/config/{name}/deploy.prototxt"),
                              size)
    torch.manual_seed(0)
    net = sc.Net(net_param)
    init_for_forward(net)         # random weights, unit BatchNorm statistics
    return net


def deploy_inputs(net, name):
    gen = torch.Generator().manual_seed(1)
    inputs = {k: torch.rand(s, generator=gen) * 255 for k, s in net.input_shapes.items()}
    if name == "embs":            # channel 3 of image_data holds the labels; positions in [0, 1)
        inputs["pos_data"] = torch.rand(inputs["pos_data"].shape, generator=gen)
        labels = torch.randint(0, 4, inputs["image_data"][:, 3:].shape, generator=gen).float()
        labels[..., :5, :5] = 255
        inputs["image_data"][:, 3:] = labels
    return inputs


DEPLOY = [pytest.param("embs", 65, id="embs"), pytest.param("vgg", 65, id="vgg"),
          pytest.param("res", 129, id="res", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name, size", DEPLOY)
def test_released_deploy_nets_in_onnxruntime(reference, tmp_path, name, size):
    """The paper's nets at a small size with random weights: onnxruntime within 1e-4 of sc.Net
    (relative to max|ref| per output), the segmentation-aware layers in standard operators."""
    import onnx
    net = deploy_net(reference, name, size)
    inputs = deploy_inputs(net, name)
    start = time.perf_counter()
    errors, got, ref = check_net(net, inputs, tmp_path, f"{name} deploy at {size}")
    print(f"{name}: export, check and run {time.perf_counter() - start:.1f} s")
    graph = onnx.load(str(tmp_path / "net.onnx")).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains          # standard operators only
    for blob, value in ref.items():
        assert value.numel() == 1 or value.std() > 0, f"{blob}: degenerate output"
    if name == "vgg":
        assert set(got) == {"fc8_interp"}                 # `label` is an input passed through
        assert sum(node.op_type == "MatMul" for node in graph.node) >= 14
    if name == "res":
        assert set(got) == {"crf_interp", "emb", "fc1_voc12_res075"}
    if name == "embs":
        assert set(got) == {"loss_avg", "pos_1"} and ref["loss_avg"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("prototxt", BVLC, ids=lambda p: p.stem if p else "reference")
def test_bvlc_nets_run_in_onnxruntime(prototxt, tmp_path):
    onnxruntime_or_skip()
    declared = sc.Net(prototxt)
    shapes = {name: (1, *shape[1:]) for name, shape in declared.input_shapes.items()}
    args = [a for name, shape in shapes.items()
            for a in ("--input-shape", f"{name}={','.join(map(str, shape))}")]
    # non-trivial weights (the deploy nets have no fillers, so they build with zeros)
    torch.manual_seed(0)
    for p in declared.learnable_params:
        with torch.no_grad():
            p.normal_(0, 0.02)
    tensors = tmp_path / "w.safetensors"
    declared.save_weights(tmp_path / "w.caffemodel")
    assert main(["convert", str(prototxt), str(tmp_path / "w.caffemodel"), "-o", str(tensors)]) == 0
    onnx_path = tmp_path / "net.onnx"
    assert main(["export", str(prototxt), str(tensors), "--onnx", str(onnx_path), *args]) == 0
    session = session_for(onnx_path)
    inputs = {name: torch.randn(shape) * 50 for name, shape in shapes.items()}
    outputs = [o.name for o in session.get_outputs()]
    got = session.run(outputs, {i.name: inputs[i.name].numpy() for i in session.get_inputs()})
    ref = declared.forward(outputs=outputs, **inputs)
    for name, value in zip(outputs, got):
        expected = ref[name].detach().numpy()
        error = np.abs(value - expected).max() / np.abs(expected).max()
        print(f"{prototxt.stem} {name}: onnxruntime vs Net max relative error {error:.2e}")
        assert expected.std() > 0, "degenerate output, the comparison would prove nothing"
        assert error <= ONNX_MAXREL


def test_cli_exports_the_vgg_deploy_net(reference, tmp_path, capsys):
    """`export --onnx` on the released vgg deploy net (resized) writes a checked file, says what
    it left out and refuses to replace it without --force."""
    onnxruntime_or_skip()
    net_param = resize_deploy(caffe_proto.read_net(reference / "segaware/config/vgg/deploy.prototxt"), 33)
    prototxt = tmp_path / "deploy.prototxt"
    caffe_proto.write_net(net_param, prototxt)
    out = tmp_path / "vgg.onnx"
    assert main(["export", str(prototxt), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: inputs data; outputs fc8_interp" in printed
    assert "left out 'label': input(s) passed through unchanged" in printed
    assert "onnxruntime matches the net: max relative error" in printed
    assert main(["export", str(prototxt), "--onnx", str(out)]) == 1
    assert "pass --force to replace it" in capsys.readouterr().err
    assert main(["export", str(prototxt), "--onnx", str(out), "--force", "--no-verify"]) == 0
    assert "not verified: not asked" in capsys.readouterr().out


def test_cli_names_the_layers_without_an_onnx_form(golden, tmp_path, capsys):
    out = tmp_path / "crf.onnx"
    assert main(["export", str(golden / "layers/densecrf/net.prototxt"), "--onnx", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot export net 'densecrf' to ONNX: 1 layer(s) have no ONNX form: crf (DenseCRF)" in err
    assert not out.exists()
