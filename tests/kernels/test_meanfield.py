"""NormConvMeanfield: kernels/meanfield.py and the NormConvMeanfield layer."""
import dataclasses
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segaware_caffe import caffe_proto
from segaware_caffe.kernels.geometry import ConvGeometry
from segaware_caffe.kernels.im2dist import im2dist
from segaware_caffe.kernels.meanfield import MessageSpec, crf_message_op, normconv_meanfield
from segaware_caffe import BuildContext, LayerSetupError
from segaware_caffe.layers.norm_conv_meanfield import NormConvMeanfield
from tests.conftest import cpu_and_cuda
from tests.kernels.cuda_emulation import emulate_cuda

meanfield_module = importlib.import_module("segaware_caffe.kernels.meanfield")
from tests.layers.helpers import build
from tests.tolerances import assert_close


assert_golden = assert_close    # the golden tolerance of tests/tolerances.py


def layer_text(param):
    return (f'layer {{ name: "crf" type: "NormConvMeanfield" bottom: "u" bottom: "q0" bottom: "fb" '
            f'bottom: "fs" top: "crf" norm_conv_meanfield_param {{ {param} }} }}')


RELEASED = ("num_iterations: 2 remove_center: true remove_bounds: true remove_center: true "
            "remove_bounds: true kernel_size: 5 pad: 4 dilation: 2 scale: 1.0 kernel_size: 3 pad: 1 "
            "dilation: 1 scale: 0.5")


def build_layer(text, bottom_shapes, layer_name="crf"):
    """Layer `layer_name` of the net text `text`, set up for bottom_shapes."""
    return build(next(lp for lp in caffe_proto.read_net(text).layer if lp.name == layer_name),
                 bottom_shapes)


def shapes(n=1, c=4, h=9, w=8, eb=3, es=2):
    return [(n, c, h, w), (n, c, h, w), (n, eb, h, w), (n, es, h, w)]


def reference_message(q, features, spec):
    """Message from the maths with an explicit column matrix (dilation >= 1)."""
    dist = im2dist(features, spec.kernel, pad=spec.pad, stride=spec.stride, dilation=spec.dilation,
                   norm="L2", remove_center=spec.remove_center, remove_bounds=spec.remove_bounds)
    attention = torch.softmax(-spec.scale * dist, dim=1)
    n, c = q.shape[:2]
    cols = F.unfold(q, spec.kernel, dilation=spec.dilation, padding=spec.pad, stride=spec.stride)
    taps = spec.kernel ** 2
    msg = (cols.reshape(n, c, taps, -1) * attention.reshape(n, 1, taps, -1)).sum(2)
    return msg.reshape(n, c, *dist.shape[-2:])


def reference_meanfield(unary, q0, fb, fs, ws, wb, compat, iterations, bilateral, spatial):
    n, c, h, w = unary.shape
    x = q0
    for _ in range(iterations):
        q = torch.softmax(x, dim=1)
        # the C x C products read the first C*H*W values of each image's message buffer
        s = reference_message(q, fs, spatial).reshape(n, -1)[:, :c * h * w].reshape(n, c, h * w)
        b = reference_message(q, fb, bilateral).reshape(n, -1)[:, :c * h * w].reshape(n, c, h * w)
        m = torch.einsum("oc,ncp->nop", ws.reshape(c, c), s) + torch.einsum("oc,ncp->nop", wb.reshape(c, c), b)
        x = unary - torch.einsum("oc,ncp->nop", compat.reshape(c, c), m).reshape(n, c, h, w)
    return x


def random_inputs(n, c, h, w, eb, es, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *size: torch.randn(*size, generator=gen, dtype=dtype).to(device)  # noqa: E731
    return (3 * make(n, c, h, w), 3 * make(n, c, h, w), make(n, eb, h, w), make(n, es, h, w),
            make(c, c), make(c, c), make(c, c))


# --------------------------------------------------------------------------------- golden cases
@pytest.mark.parametrize("case, bottoms", [
    ("normconvmeanfield_small", ("unary", "q0", "feat", "xy")),
    ("normconvmeanfield_3iter", ("unary", "q0", "rgbxy", "scaled_xy2")),
])
def test_golden(golden, case, bottoms):
    folder = golden / "layers" / case
    data = np.load(folder / "data.npz")
    # bottoms 2/3 may come from layers of the case net (DummyData xy, Scale): use their stored values
    inputs = [torch.tensor(data[f"out/{name}"], requires_grad=True) for name in bottoms]
    layer = build_layer(folder / "net.prototxt", [t.shape for t in inputs])
    blobs = layer.caffe_blobs()
    assert len(blobs) == 3
    with torch.no_grad():
        for index, blob in enumerate(blobs):
            blob.copy_(torch.from_numpy(data[f"param/crf/{index}"]))
    y = layer(*inputs)
    errors = {"crf": assert_golden(y, data["out/crf"], f"{case} forward")}
    y.backward(torch.from_numpy(data["topdiff/crf"]))
    for name, tensor in zip(bottoms, inputs):
        errors[f"d{name}"] = assert_golden(tensor.grad, data[f"diff/{name}"], f"{case} d{name}")
    for index, blob in enumerate(blobs):
        errors[f"dblob{index}"] = assert_golden(blob.grad, data[f"paramdiff/crf/{index}"],
                                                f"{case} d blob {index}")
    print(case, {k: f"{v:.1e}" for k, v in errors.items()})


# ----------------------------------------------------------------------- reference and gradients
SPEC_PAIRS = [
    # (bilateral, spatial): aligned; a grid larger than the input (read as the original reads it)
    (MessageSpec(5, pad=4, dilation=2, scale=1.0), MessageSpec(3, pad=1, scale=0.5)),
    (MessageSpec(3, pad=2, dilation=1, scale=0.8, remove_center=False),
     MessageSpec(3, pad=3, dilation=3, scale=2.0, remove_bounds=False)),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("bilateral, spatial", SPEC_PAIRS)
@pytest.mark.parametrize("n, iterations", [(1, 2), (2, 3)])
def test_matches_reference(device, bilateral, spatial, n, iterations):
    inputs = random_inputs(n, 4, 9, 7, 3, 2, device=device)
    got = normconv_meanfield(*inputs, num_iterations=iterations, bilateral=bilateral, spatial=spatial)
    expected = reference_meanfield(*inputs, iterations, bilateral, spatial)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("bilateral, spatial", SPEC_PAIRS)
def test_gradcheck(device, bilateral, spatial):
    inputs = tuple(t.requires_grad_() for t in random_inputs(2, 3, 6, 5, 2, 2, device=device, seed=1))

    def fn(*args):
        return normconv_meanfield(*args, num_iterations=2, bilateral=bilateral, spatial=spatial)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


MESSAGE_GEOMETRIES = [ConvGeometry.of((3, 2), (1, 0), (2, 1), (2, 1)), ConvGeometry.of(5, 1, 2, 1),
                      ConvGeometry.of(3, 1, 1, 1)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("geometry", MESSAGE_GEOMETRIES)
def test_message_function(device, geometry):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 2, 7, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    out_h, out_w = geometry.output_size(7, 6)
    attention = torch.rand(3, geometry.taps, out_h, out_w, generator=gen,
                           dtype=torch.float64).to(device).requires_grad_()
    got = crf_message_op(q, attention, geometry.as_list())
    cols = F.unfold(q, geometry.kernel, dilation=geometry.dilation, padding=geometry.pad,
                    stride=geometry.stride).reshape(3, 2, geometry.taps, -1)
    expected = (cols * attention.reshape(3, 1, geometry.taps, -1)).sum(2).reshape(3, 2, out_h, out_w)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: crf_message_op(a, b, geometry.as_list()), (q, attention),
                                    fast_mode=True)


@pytest.mark.parametrize("geometry", MESSAGE_GEOMETRIES + [ConvGeometry((3, 3), (0, 0), (1, 1), (0, 0))])
def test_message_in_bands_of_rows_equals_whole_planes(monkeypatch, geometry):
    """The CPU message adds every tap into bands of output rows: bands of one row, and of two
    (the last one shorter), give the whole planes' values exactly (same order per element)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 9, 7, generator=gen, dtype=torch.float64)
    out_h, out_w = geometry.output_size(9, 7)
    attention = torch.rand(2, geometry.taps, out_h, out_w, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(meanfield_module, "CPU_BAND_BYTES", 1 << 40)
    whole = meanfield_module._message_forward_cpu(q, attention, geometry)
    row_bytes = 2 * 3 * out_w * 8
    for rows in (1, 2):
        monkeypatch.setattr(meanfield_module, "CPU_BAND_BYTES", rows * row_bytes)
        assert torch.equal(meanfield_module._message_forward_cpu(q, attention, geometry), whole)


@pytest.mark.needs_cuda
def test_cuda_matches_cpu():
    bilateral, spatial = SPEC_PAIRS[0]
    cpu_inputs = random_inputs(2, 5, 11, 9, 3, 2, dtype=torch.float32, seed=4)
    results = []
    for device in ("cpu", "cuda"):
        inputs = tuple(t.to(device).requires_grad_() for t in cpu_inputs)
        y = normconv_meanfield(*inputs, num_iterations=2, bilateral=bilateral, spatial=spatial)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape))
        results.append([y.detach().cpu()] + [t.grad.cpu() for t in inputs])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- quirks
def test_default_blobs_add_both_messages():
    # W_s = W_b = I, compat = -I: every update is X = U + S + B
    layer = build_layer(layer_text(RELEASED), shapes())
    inputs = [t.float() for t in random_inputs(1, 4, 9, 8, 3, 2)[:4]]
    eye = torch.eye(4)
    expected = reference_meanfield(*inputs, eye, eye, -eye, 2, layer.bilateral, layer.spatial)
    torch.testing.assert_close(layer(*inputs), expected, rtol=1e-5, atol=1e-5)
    spatial_w, bilateral_w, compat = layer.caffe_blobs()
    assert torch.equal(compat.detach(), -eye.reshape(1, 1, 4, 4))
    assert torch.equal(spatial_w.detach(), eye.reshape(1, 1, 4, 4))


def test_blob_roles():
    # blob 0 weighs the spatial message (bottom 3), blob 1 the bilateral one (bottom 2)
    layer = build_layer(layer_text(RELEASED), shapes())
    inputs = [t.float() for t in random_inputs(1, 4, 9, 8, 3, 2, seed=5)[:4]]
    with torch.no_grad():
        layer.bilateral_weight.zero_()
    only_spatial = layer(*inputs)
    bilateral_features_changed = [inputs[0], inputs[1], torch.randn_like(inputs[2]), inputs[3]]
    torch.testing.assert_close(layer(*bilateral_features_changed), only_spatial)


def test_dilation_and_scale_defaults_are_the_originals():
    # dilation 0: every tap reads the centre, so each message is Q zero-padded by `pad` on an
    # (H+2p) x (W+2p) grid, of which the CRF reads the first C*H*W values of each image
    text = layer_text("num_iterations: 2 kernel_size: 3 kernel_size: 3 pad: 1 pad: 2")
    with pytest.warns(UserWarning) as record:
        layer = build_layer(text, shapes(n=2, c=3, h=5, w=4))
    messages = [str(w.message) for w in record]
    assert any(m.startswith("crf (NormConvMeanfield): norm_conv_meanfield_param.dilation") for m in messages)
    assert any(m.startswith("crf (NormConvMeanfield): norm_conv_meanfield_param.scale") for m in messages)
    assert layer.bilateral.dilation == 0 and layer.bilateral.scale == 0.0
    assert layer.bilateral.remove_center and layer.spatial.remove_bounds
    unary, q0, fb, fs = (t.float() for t in random_inputs(2, 3, 5, 4, 3, 2, seed=6)[:4])
    x = q0
    for _ in range(2):
        q = torch.softmax(x, dim=1)
        read = [F.pad(q, (p, p, p, p)).reshape(2, -1)[:, :3 * 5 * 4].reshape(2, 3, 5, 4) for p in (1, 2)]
        x = unary + read[0] + read[1]
    torch.testing.assert_close(layer(unary, q0, fb, fs), x)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("param, bottom_shapes, message", [
    (RELEASED.replace("num_iterations: 2", "num_iterations: 1"), shapes(), r"num_iterations must be >= 2, got 1"),
    (RELEASED.replace("num_iterations: 2", ""), shapes(), r"num_iterations must be >= 2, got 1"),
    (RELEASED.replace("kernel_size: 3", ""), shapes(), r"kernel_size must be given exactly twice"),
    (RELEASED.replace("pad: 4", ""), shapes(), r"pad must be given 0 or 2 times"),
    (RELEASED.replace("pad: 1", "pad: 1 stride: 2 stride: 2"), shapes(), r"bilateral .* stride 2, dilation 2\) gives a 5x4 message"),
    (RELEASED.replace("pad: 4", "pad: 1"), shapes(), r"bilateral .* read past it"),
    (RELEASED, [(1, 4, 9, 8), (1, 3, 9, 8), (1, 3, 9, 8), (1, 2, 9, 8)], r"bottom 1 \(initial Q\)"),
    (RELEASED, [(1, 4, 9, 8), (1, 4, 9, 8), (1, 3, 9, 7), (1, 2, 9, 8)], r"bottom 2 \(features\)"),
    (RELEASED, [(1, 4, 9, 8), (1, 4, 9, 8), (1, 3, 9, 8), (1, 2, 9)], r"must be 4-D"),
])
def test_layer_errors(param, bottom_shapes, message):
    with pytest.raises(LayerSetupError, match=r"crf \(NormConvMeanfield\): .*" + message):
        build_layer(layer_text(param), bottom_shapes)


def test_misaligned_grid_warns():
    with pytest.warns(UserWarning, match=r"crf \(NormConvMeanfield\): the spatial .* 11x10 message"):
        build_layer(layer_text(RELEASED.replace("pad: 1", "pad: 2")), shapes())


@pytest.mark.parametrize("index, value, message", [
    (1, torch.zeros(1, 3, 9, 8), r"q0 must have unary's shape"),
    (3, torch.zeros(1, 2, 9, 9), r"feat_spatial must have unary's batch and spatial size"),
    (6, torch.zeros(4, 3), r"compat must be \(4, 4\)"),
    (2, torch.zeros(1, 3, 9, 8, dtype=torch.float64), r"share one dtype"),
])
def test_functional_errors(index, value, message):
    inputs = list(t.float() for t in random_inputs(1, 4, 9, 8, 3, 2))
    inputs[index] = value
    bilateral, spatial = SPEC_PAIRS[0]
    with pytest.raises(ValueError, match=message):
        normconv_meanfield(*inputs, num_iterations=2, bilateral=bilateral, spatial=spatial)


def test_functional_rejects_short_grid():
    inputs = random_inputs(1, 4, 9, 8, 3, 2)
    with pytest.raises(ValueError, match=r"bilateral message grid \(3, 2\) holds fewer"):
        normconv_meanfield(*inputs, num_iterations=2, spatial=SPEC_PAIRS[0][1],
                           bilateral=dataclasses.replace(SPEC_PAIRS[0][0], pad=1))


@pytest.mark.parametrize("geometry", MESSAGE_GEOMETRIES)
def test_cuda_source_matches_cpu_path(geometry, monkeypatch):
    # the CUDA kernels run by the CPU emulation, grid-stride loops wrapping (at most 2 blocks)
    emulate_cuda(monkeypatch, max_grid=2)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64)
    out_h, out_w = geometry.output_size(7, 6)
    attention = torch.rand(2, geometry.taps, out_h, out_w, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, 3, out_h, out_w, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(meanfield_module._message_forward_cuda(q, attention, geometry),
                               meanfield_module._message_forward_cpu(q, attention, geometry))
    for emulated, reference in zip(
            meanfield_module._message_backward_cuda(grad_out, q, attention, geometry, (True, True)),
            meanfield_module._message_backward_cpu(grad_out, q, attention, geometry, (True, True))):
        torch.testing.assert_close(emulated, reference)


def test_released_layer(reference, recwarn):
    net = caffe_proto.read_net(reference / "segaware" / "config" / "res" / "deploy.prototxt")
    param = next(lp for lp in net.layer if lp.type == "NormConvMeanfield")
    ctx = BuildContext(name=param.name, type=param.type, phase="TEST",
                       bottom_shapes=[(1, 21, 257, 257)] * 2 + [(1, 5, 257, 257), (1, 2, 257, 257)])
    layer = NormConvMeanfield.from_proto(param, ctx)
    assert not [w for w in recwarn if "NormConvMeanfield" in str(w.message)]
    assert layer.num_iterations == 2
    assert layer.bilateral == MessageSpec(13, pad=54, dilation=9, scale=1.0)
    assert layer.spatial == MessageSpec(5, pad=2, dilation=1, scale=1.0)
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == [(1, 1, 21, 21)] * 3
