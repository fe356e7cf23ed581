"""NormConv: kernels/norm_conv.py and the NormConv layer."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segaware_caffe import caffe_proto
from segaware_caffe.kernels.geometry import ConvGeometry
from segaware_caffe.kernels.im2dist import BIG, im2dist
from segaware_caffe.kernels.norm_conv import attention_conv_op, norm_conv
from segaware_caffe import LayerSetupError
from segaware_caffe.errors import UnsupportedError
from tests.conftest import cpu_and_cuda
from tests.kernels.cuda_emulation import emulate_cuda

norm_conv_module = importlib.import_module("segaware_caffe.kernels.norm_conv")
from tests.layers.helpers import build
from tests.tolerances import assert_close


assert_golden = assert_close    # the golden tolerance of tests/tolerances.py


def build_layer(prototxt, layer_name, bottom_shapes):
    """Layer `layer_name` of the net text `prototxt`, set up for bottom_shapes."""
    return build(next(lp for lp in caffe_proto.read_net(prototxt).layer if lp.name == layer_name),
                 bottom_shapes)


def layer_text(conv="num_output: 4 kernel_size: 3 pad: 1", norm_conv_param=""):
    return (f'layer {{ name: "nc" type: "NormConv" bottom: "x" bottom: "f" top: "y" '
            f'convolution_param {{ {conv} }} norm_conv_param {{ {norm_conv_param} }} }}')


def reference_norm_conv(x, emb, weight, bias, scale, *, kernel, pad, stride, dilation, group, norm,
                        remove_center, remove_bounds, scale_term):
    """Straight from the maths with an explicit column matrix: y = W · (A ⊙ im2col(x)) + b."""
    dist = im2dist(emb, kernel, pad=pad, stride=stride, dilation=dilation, norm=norm,
                   remove_center=remove_center, remove_bounds=remove_bounds)
    attention = torch.softmax(-scale * dist if scale_term else dist, dim=1)
    n, channels = x.shape[:2]
    taps = kernel[0] * kernel[1]
    cols = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)   # (N, C*K, L)
    cols = cols.reshape(n, channels, taps, -1) * attention.reshape(n, 1, taps, -1)
    cols = cols.reshape(n, group, channels // group * taps, -1)
    w = weight.reshape(group, weight.shape[0] // group, -1)
    out = torch.matmul(w, cols).reshape(n, weight.shape[0], *dist.shape[-2:])
    return out + bias.view(1, -1, 1, 1) if bias is not None else out


# --------------------------------------------------------------------------------- golden cases
@pytest.mark.parametrize("case, has_bias", [("normconv", True), ("normconv_l1_group3", False)])
def test_golden(golden, case, has_bias):
    folder = golden / "layers" / case
    data = np.load(folder / "data.npz")
    x = torch.tensor(data["in/x"], requires_grad=True)
    emb = torch.tensor(data["in/f"], requires_grad=True)
    layer = build_layer(folder / "net.prototxt", "nc", [x.shape, emb.shape])
    blobs = layer.caffe_blobs()
    assert len(blobs) == (3 if has_bias else 2)
    with torch.no_grad():
        for index, blob in enumerate(blobs):
            blob.copy_(torch.from_numpy(data[f"param/nc/{index}"]))
    y = layer(x, emb)
    errors = {"y": assert_golden(y, data["out/y"], f"{case} forward")}
    y.backward(torch.from_numpy(data["topdiff/y"]))
    errors["dx"] = assert_golden(x.grad, data["diff/x"], f"{case} dx")
    errors["df"] = assert_golden(emb.grad, data["diff/f"], f"{case} d embedding")
    for index, blob in enumerate(blobs):
        errors[f"dblob{index}"] = assert_golden(blob.grad, data[f"paramdiff/nc/{index}"],
                                                f"{case} d blob {index}")
    print(case, {k: f"{v:.1e}" for k, v in errors.items()})


# ----------------------------------------------------------------------- reference and gradients
AWKWARD = [
    # (N, C, E, H, W, O, kernel, pad, stride, dilation, group)
    (1, 3, 2, 7, 9, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 4, 3, 9, 6, 6, (3, 2), (1, 0), (2, 1), (2, 1), 2),
    (2, 3, 1, 5, 8, 3, (1, 1), (0, 0), (1, 1), (1, 1), 3),
    (2, 2, 2, 6, 7, 4, (5, 3), (3, 2), (1, 2), (1, 2), 2),
]


def random_case(shape, dtype, device, seed=0):
    n, c, e, h, w, o, kernel, pad, stride, dilation, group = shape
    gen = torch.Generator().manual_seed(seed)
    make = lambda *size: torch.randn(*size, generator=gen, dtype=dtype).to(device)  # noqa: E731
    tensors = (make(n, c, h, w), make(n, e, h, w), make(o, c // group, *kernel), make(o),
               torch.tensor([0.7], dtype=dtype, device=device))
    geometry = dict(kernel=kernel, pad=pad, stride=stride, dilation=dilation, group=group)
    return tensors, geometry


def call(tensors, geometry, **flags):
    kernel = geometry["kernel"]
    return norm_conv(*tensors, kernel_size=kernel, pad=geometry["pad"], stride=geometry["stride"],
                     dilation=geometry["dilation"], group=geometry["group"], **flags)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", AWKWARD)
@pytest.mark.parametrize("norm, remove_center, remove_bounds, scale_term", [
    ("L2", False, False, True), ("L1", True, True, True), ("L2", True, False, False)])
def test_forward_matches_reference(device, shape, norm, remove_center, remove_bounds, scale_term):
    tensors, geometry = random_case(shape, torch.float64, device)
    flags = dict(norm=norm, remove_center=remove_center, remove_bounds=remove_bounds,
                 scale_term=scale_term)
    got = call(tensors, geometry, **flags)
    expected = reference_norm_conv(*tensors, **geometry, **flags)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("contiguous", [True, False])
def test_non_contiguous_and_float32(device, contiguous):
    tensors, geometry = random_case(AWKWARD[1], torch.float32, device, seed=3)
    if not contiguous:   # same values, permuted memory layout
        tensors = tuple(t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 4 else t
                        for t in tensors)
        assert not tensors[0].is_contiguous()
    got = call(tensors, geometry, norm="L2", remove_center=True, remove_bounds=True)
    expected = reference_norm_conv(*(t.double() for t in tensors), **geometry, norm="L2",
                                   remove_center=True, remove_bounds=True, scale_term=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", AWKWARD)
@pytest.mark.parametrize("scale_term", [True, False])
def test_gradcheck(device, shape, scale_term):
    # L2 distances are smooth and the remove flags give BIG (weight-0) taps: exact derivative
    tensors, geometry = random_case(shape, torch.float64, device, seed=1)
    tensors = tuple(t.requires_grad_() for t in tensors)

    def fn(*args):
        return call(args, geometry, norm="L2", remove_center=True, remove_bounds=True,
                    scale_term=scale_term)

    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


def test_gradient_of_selected_inputs_only():
    tensors, geometry = random_case(AWKWARD[1], torch.float64, "cpu", seed=2)
    x, emb, weight, bias, scale = tensors
    x.requires_grad_()
    call((x, emb, weight, None, scale), geometry, norm="L2").sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert weight.grad is None and emb.grad is None


@pytest.mark.needs_cuda
def test_cuda_matches_cpu():
    tensors, geometry = random_case(AWKWARD[1], torch.float32, "cpu", seed=4)
    results = []
    for device in ("cpu", "cuda"):
        inputs = tuple(t.to(device).requires_grad_() for t in tensors)
        y = call(inputs, geometry, norm="L1", remove_center=True, remove_bounds=False)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape))
        results.append([y.detach().cpu()] + [t.grad.cpu() for t in inputs])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- quirks
def test_zero_scale_is_uniform_over_every_tap():
    # scale 0 (the default filler): all K taps get 1/K, removed and out-of-image ones included
    x = torch.ones(1, 1, 3, 3)
    emb = torch.randn(1, 2, 3, 3)
    y = norm_conv(x, emb, torch.ones(1, 1, 3, 3), None, torch.zeros(1), kernel_size=3, pad=1,
                  remove_center=True, remove_bounds=True)
    # corner: 4 of the 9 taps read the image; middle: all 9
    torch.testing.assert_close(y[0, 0], torch.tensor([[4., 6, 4], [6, 9, 6], [4, 6, 4]]) / 9)


def test_removed_taps_get_no_weight():
    x = torch.arange(9.).reshape(1, 1, 3, 3)
    y = norm_conv(x, torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3), None, torch.ones(1),
                  kernel_size=3, pad=1, remove_center=True, remove_bounds=True)
    # with equal embeddings, the output is the mean of the in-image neighbours (centre excluded)
    centre_mean = (x.sum() - 4) / 8
    torch.testing.assert_close(y[0, 0, 1, 1], centre_mean)
    assert float(im2dist(torch.zeros(1, 1, 3, 3), 3, pad=1, remove_center=True)[0, 4, 1, 1]) == BIG


# ------------------------------------------------------------------------------------- layer
def test_layer_defaults_and_blob_order():
    layer = build_layer(layer_text(), "nc", [(2, 3, 5, 5), (2, 4, 5, 5)])
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == [(4, 3, 3, 3), (4,), (1,)]
    assert layer.scale.item() == 0.0            # scale_filler defaults to constant 0
    assert layer.norm == "L2" and not layer.remove_center and not layer.remove_bounds
    layer = build_layer(layer_text("num_output: 2 kernel_size: 3 bias_term: false",
                                   "scale_term: false norm: L1 scale_filler { value: 2 }"),
                        "nc", [(1, 2, 5, 5), (1, 1, 5, 5)])
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == [(2, 2, 3, 3)]
    assert layer(torch.randn(1, 2, 5, 5), torch.randn(1, 1, 5, 5)).shape == (1, 2, 3, 3)
    layer = build_layer(layer_text("num_output: 2 kernel_size: 3 bias_term: false",
                                   "scale_filler { value: 2 }"), "nc", [(1, 2, 5, 5), (1, 1, 5, 5)])
    assert layer.caffe_blobs()[1].item() == 2.0  # the scale is blob 1 without a bias


@pytest.mark.parametrize("conv, shapes, message", [
    ("kernel_size: 3", [(1, 2, 5, 5), (1, 1, 5, 5)], r"nc \(NormConv\): convolution_param.num_output"),
    ("num_output: 3 kernel_size: 3 group: 2", [(1, 4, 5, 5), (1, 1, 5, 5)], r"nc \(NormConv\):.*group 2"),
    ("num_output: 2 kernel_size: 3", [(1, 2, 5, 5), (1, 1, 5, 6)], r"nc \(NormConv\): bottom 1"),
    ("num_output: 2 kernel_size: 3", [(1, 2, 5), (1, 1, 5)], r"nc \(NormConv\):.*4-D"),
    ("num_output: 2 kernel_size: 7", [(1, 2, 5, 5), (1, 1, 5, 5)], r"nc \(NormConv\):.*empty output"),
])
def test_layer_errors(conv, shapes, message):
    with pytest.raises(LayerSetupError, match=message):
        build_layer(layer_text(conv), "nc", shapes)


def test_layer_rejects_bottom_is_im2col():
    with pytest.raises(UnsupportedError, match=r"nc \(NormConv\): .*bottom_is_im2col"):
        build_layer(layer_text("num_output: 2 kernel_size: 3 bottom_is_im2col: true"), "nc",
                    [(1, 18, 5, 5), (1, 1, 5, 5)])


@pytest.mark.parametrize("change, message", [
    (dict(weight=torch.zeros(2, 3, 3, 3)), r"weight must have shape \(2, 2, 3, 3\)"),
    (dict(emb=torch.zeros(1, 1, 4, 5)), r"emb must have x's batch size and spatial size"),
    (dict(scale=None), r"scale_term needs a 1-element scale"),
    (dict(bias=torch.zeros(3)), r"bias must have shape \(2,\)"),
    (dict(x=torch.zeros(1, 2, 5)), r"x must be 4-D"),
    (dict(scale=torch.zeros(1, dtype=torch.float64)), r"share one dtype"),
])
def test_functional_errors(change, message):
    args = dict(x=torch.zeros(1, 2, 5, 5), emb=torch.zeros(1, 1, 5, 5), weight=torch.zeros(2, 2, 3, 3),
                bias=torch.zeros(2), scale=torch.zeros(1))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        norm_conv(args["x"], args["emb"], args["weight"], args["bias"], args["scale"], kernel_size=3)


def test_double_backward_is_refused():
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    attention = torch.softmax(torch.randn(1, 9, 2, 2, dtype=torch.float64), 1).requires_grad_()
    y = attention_conv_op(x, attention, torch.ones(1, 1, 3, 3, dtype=torch.float64), None,
                          ConvGeometry.of(3).as_list(), 1)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula|does not require grad"):
        grad.sum().backward()


# ------------------------------------------------------------- CUDA source, emulated on the CPU
@pytest.mark.parametrize("shape", AWKWARD)
def test_cuda_source_matches_cpu_path(shape, monkeypatch):
    """The CUDA kernels, run by the CPU emulation on a grid of at most 2 blocks per dimension
    (the grid-stride loops wrap), against the CPU path."""
    emulate_cuda(monkeypatch, max_grid=2)
    (x, emb, weight, bias, _), geometry = random_case(shape, torch.float64, "cpu", seed=5)
    patch = ConvGeometry.of(geometry["kernel"], geometry["pad"], geometry["stride"],
                            geometry["dilation"])
    group = geometry["group"]
    out_h, out_w = patch.output_size(*x.shape[2:])
    attention = torch.softmax(torch.randn(x.shape[0], patch.taps, out_h, out_w,
                                          dtype=torch.float64), 1)
    grad_out = torch.randn(x.shape[0], weight.shape[0], out_h, out_w, dtype=torch.float64)
    for with_bias in (bias, None):
        torch.testing.assert_close(
            norm_conv_module._forward_cuda(x, attention, weight, with_bias, patch, group),
            norm_conv_module._forward_cpu(x, attention, weight, with_bias, patch, group))
    needs = (True, True, True)
    for emulated, reference in zip(
            norm_conv_module._backward_cuda(grad_out, x, attention, weight, patch, group, needs),
            norm_conv_module._backward_cpu(grad_out, x, attention, weight, patch, group, needs)):
        torch.testing.assert_close(emulated, reference)
