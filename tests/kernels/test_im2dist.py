"""kernels.im2dist and the Im2dist layer: a pure-Python reference written from the definition,
the original's golden numbers, float64 gradcheck (L2), the CUDA kernels (emulated on the CPU)
against the CPU path, bad inputs."""
import importlib

import numpy as np
import pytest
import torch

from segaware_caffe.caffe_proto import read_net
from segaware_caffe.kernels import BIG, im2dist
from segaware_caffe.kernels.geometry import ConvGeometry
from segaware_caffe import LayerSetupError
from tests.conftest import cpu_and_cuda
from tests.kernels.cuda_emulation import emulate_cuda
from tests.kernels.layer_helpers import assert_golden_close, build_layer, window_taps

GOLDEN_CASES = ["im2dist_l1_k13p54d9", "im2dist_l1_k3p1", "im2dist_l1_k3p1s2",
          "im2dist_l1_k3p2d2_removecenter", "im2dist_l1_k5p2_removebounds", "im2dist_l2_k3p1",
          "im2dist_l2_k3p6d2"]

# (shape, kernel, pad, stride, dilation): odd sizes, batch 1 and 3, non-square kernels,
# dilation > 1, stride 2, a pad that puts patch centres outside the image
GEOMETRIES = [
    ((1, 2, 5, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3, 7, 5), (3, 2), (1, 0), (2, 1), (1, 1)),
    ((2, 1, 6, 7), (2, 3), (0, 2), (1, 2), (2, 1)),
    ((1, 4, 9, 8), (3, 3), (2, 2), (1, 1), (2, 2)),
    ((2, 2, 5, 5), (3, 3), (4, 3), (2, 1), (1, 2)),
]


def reference_im2dist(x, geometry, norm, remove_center, remove_bounds):
    """Loops over every output element, straight from the spec (float64)."""
    x = x.detach().double().cpu().numpy()
    out = np.zeros((x.shape[0], geometry.taps, *geometry.output_size(*x.shape[2:])))
    for n, k, ho, wo, (ch, cw), (nh, nw), centre_in, tap_in, is_centre in window_taps(x.shape, geometry):
        if not centre_in:
            value = 0.0
        elif remove_center and is_centre:
            value = BIG
        elif tap_in:
            d = x[n, :, ch, cw] - x[n, :, nh, nw]
            value = np.abs(d).sum() if norm == "L1" else 0.5 * (d * d).sum()
        else:
            value = BIG if remove_bounds else 0.0
        out[n, k, ho, wo] = value
    return out


def reference_im2dist_grad(x, grad_out, geometry, norm):
    """Backward of the original's GPU path: sign(0) = 0 for L1, exact for L2."""
    x = x.detach().double().cpu().numpy()
    grad_out = grad_out.detach().double().cpu().numpy()
    grad = np.zeros_like(x)
    for n, k, ho, wo, (ch, cw), (nh, nw), centre_in, tap_in, is_centre in window_taps(x.shape, geometry):
        if is_centre or not (centre_in and tap_in):
            continue
        d = x[n, :, ch, cw] - x[n, :, nh, nw]
        coefficient = np.sign(d) if norm == "L1" else d
        grad[n, :, ch, cw] += coefficient * grad_out[n, k, ho, wo]
        grad[n, :, nh, nw] -= coefficient * grad_out[n, k, ho, wo]
    return grad


def make_input(shape, dtype, device, contiguous, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    # a few exact ties (equal neighbours), where the L1 gradient rule matters
    x[..., 1, :] = x[..., 0, :]
    x = x.to(device)
    if not contiguous:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        assert not x.is_contiguous()
    return x.requires_grad_(True)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
@pytest.mark.parametrize("norm, remove_center, remove_bounds",
                         [("L1", False, False), ("L2", False, False), ("L1", True, True),
                          ("L2", True, False)])
def test_forward_backward_match_reference(device, dtype, contiguous, geometry_case, norm,
                                          remove_center, remove_bounds):
    shape, kernel, pad, stride, dilation = geometry_case
    geometry = ConvGeometry.of(kernel, pad, stride, dilation)
    x = make_input(shape, dtype, device, contiguous)
    out = im2dist(x, kernel, pad, stride, dilation, norm=norm, remove_center=remove_center,
                  remove_bounds=remove_bounds)
    expected = reference_im2dist(x, geometry, norm, remove_center, remove_bounds)
    assert out.shape == expected.shape and out.dtype == dtype and out.device == x.device
    got = out.detach().double().cpu().numpy()
    big = expected == BIG
    assert np.array_equal(got == np.float64(np.float32(BIG)), big)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(got[~big], expected[~big], rtol=tolerance, atol=tolerance)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(dtype=dtype, device=device)
    (grad_x,) = torch.autograd.grad(out, x, grad_out)
    np.testing.assert_allclose(grad_x.double().cpu().numpy(),
                               reference_im2dist_grad(x, grad_out, geometry, norm),
                               rtol=tolerance * 10, atol=tolerance * 10)


def test_l1_gradient_follows_gpu_rule_on_constant_input():
    """The original's CPU path gives [[-5,-3,-5],[-3,0,-3],[-5,-3,-5]] here (sign(0) = -1); its
    GPU path, which the released models used, and we, give no gradient at all."""
    x = torch.ones(1, 1, 3, 3, requires_grad=True)
    im2dist(x, 3, pad=1, norm="L1").sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("geometry_case", GEOMETRIES[:4])
def test_l2_gradcheck(geometry_case):
    shape, kernel, pad, stride, dilation = geometry_case
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: im2dist(t, kernel, pad, stride, dilation, norm="L2", remove_bounds=True), (x,))


def test_l1_gradcheck_away_from_ties():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: im2dist(t, 3, pad=1, norm="L1"), (x,), eps=1e-7)


def test_double_backward_is_refused():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    out = im2dist(x, 3, pad=1)
    grad_out = torch.ones_like(out, requires_grad=True)
    (grad,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad.sum().backward()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_cuda_matches_cpu(norm):
    x = torch.randn(3, 5, 17, 13, dtype=torch.float64)
    x[:, :, 4] = x[:, :, 5]
    results = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_(True)
        out = im2dist(xd, (3, 5), (2, 3), (2, 1), (2, 1), norm=norm, remove_center=True)
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        out.backward(grad_out.to(device))
        results.append((out.detach().cpu(), xd.grad.cpu()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry_case", GEOMETRIES)
@pytest.mark.parametrize("norm, remove_center, remove_bounds",
                         [("L1", False, False), ("L2", True, True), ("L1", True, False)])
def test_cuda_source_matches_cpu_path(monkeypatch, geometry_case, norm, remove_center,
                                      remove_bounds):
    """The CUDA kernels, run by the CPU emulation on a grid of at most 2 blocks per dimension
    (so the grid-stride loops wrap), against the CPU path."""
    emulate_cuda(monkeypatch, max_grid=2)
    module = importlib.import_module("segaware_caffe.kernels.im2dist")
    shape, kernel, pad, stride, dilation = geometry_case
    geometry = ConvGeometry.of(kernel, pad, stride, dilation)
    x = make_input(shape, torch.float64, "cpu", True).detach()
    l1 = norm == "L1"
    expected = module._forward_cpu(x, geometry, l1, remove_center, remove_bounds)
    torch.testing.assert_close(module._forward_cuda(x, geometry, l1, remove_center, remove_bounds),
                               expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    torch.testing.assert_close(module._backward_cuda(grad_out, x, geometry, l1),
                               module._backward_cpu(grad_out, x, geometry, l1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden(golden, case):
    folder = golden / "layers" / case
    data = np.load(folder / "data.npz")
    layer_param = read_net(folder / "net.prototxt").layer[0]
    x = torch.from_numpy(data["in/x"].copy()).requires_grad_(True)
    layer = build_layer(str(layer_param), [x.shape])
    out = layer(x)
    assert_golden_close(out, data["out/dist"], f"{case} forward")
    out.backward(torch.from_numpy(data["topdiff/dist"].copy()))
    assert_golden_close(x.grad, data["diff/x"], f"{case} gradient")


def test_layer_output_shapes_and_repr():
    layer = build_layer('name: "d" type: "Im2dist" bottom: "x" top: "d" convolution_param '
                        '{ kernel_h: 3 kernel_w: 5 pad_w: 2 stride: 2 } im2dist_param { norm: L1 }',
                        [(2, 3, 9, 10)])
    assert layer.output_shapes([(2, 3, 9, 10)]) == [(2, 15, 4, 5)]
    assert "norm=L1" in repr(layer) and "stride=(2, 2)" in repr(layer)


@pytest.mark.parametrize("text, shape, message", [
    ('convolution_param { pad: 1 }', (1, 2, 5, 5), "kernel_size is required"),
    ('convolution_param { kernel_size: 9 }', (1, 2, 5, 5), "empty output"),
    ('convolution_param { kernel_size: 3 }', (2, 5, 5), "must be 4-D"),
    ('convolution_param { kernel_size: 3 stride: 0 }', (1, 2, 5, 5), "stride must be > 0"),
])
def test_layer_errors_name_the_layer(text, shape, message):
    with pytest.raises(LayerSetupError, match=rf"dist1 \(Im2dist\): .*{message}"):
        build_layer(f'name: "dist1" type: "Im2dist" bottom: "x" top: "d" {text}', [shape])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(x=torch.zeros(2, 3, 4)), ValueError, r"must be 4-D .* got shape \(2, 3, 4\)"),
    (dict(x=torch.zeros(1, 1, 4, 4, dtype=torch.int64)), TypeError,
     "x must be one of float16, bfloat16, float32, float64, got torch.int64"),
    (dict(norm="L3"), ValueError, "norm must be one of"),
    (dict(kernel_size=7), ValueError, "too small"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be an int or a pair"),
    (dict(dilation=0), ValueError, "dilation must be > 0"),
])
def test_functional_rejects_bad_inputs(kwargs, error, message):
    arguments = dict(x=torch.zeros(1, 2, 4, 4), kernel_size=3)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        im2dist(**arguments)


@pytest.mark.parametrize("shape,kernel,dilation", [
    ((3, 5, 7, 6), (3, 3), (1, 1)), ((1, 2, 9, 8), (5, 3), (2, 1)), ((2, 3, 4, 5), (7, 7), (1, 1)),
    ((1, 2, 3, 11), (3, 5), (3, 2)),
])
@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("remove_center,remove_bounds", [(False, False), (True, True)])
def test_same_geometry_path_equals_the_general_path(monkeypatch, shape, kernel, dilation, norm,
                                                    remove_center, remove_bounds):
    """Stride 1 with the patch centred on its pixel takes the path that computes one tap of
    each mirror pair (the other is its plane shifted) in bands of rows: the general path's
    result up to the order of the channel sums (float32 rounding), for offsets beyond the image,
    non-finite inputs and bands of one row."""
    module = importlib.import_module("segaware_caffe.kernels.im2dist")
    pad = ((kernel[0] // 2) * dilation[0], (kernel[1] // 2) * dilation[1])
    geometry = ConvGeometry(kernel, pad, (1, 1), dilation)
    x = make_input(shape, torch.float32, "cpu", True).detach()
    # entries that are not finite: the centre tap's phi(x - x) is NaN there, as the general
    # path's difference gives, and the mirror taps carry inf and NaN like the taps they copy
    x[0, 0, 1, 2], x[-1, -1, -1, 0], x[0, -1, 2, -1] = float("inf"), float("nan"), -float("inf")
    assert module._is_same_geometry(geometry, *shape[2:])
    args = (x, geometry, norm == "L1", remove_center, remove_bounds)
    fast = module._forward_cpu(*args)
    monkeypatch.setattr(module, "CPU_BAND_BYTES", 1)
    banded = module._forward_cpu(*args)
    monkeypatch.setattr(module, "_is_same_geometry", lambda *a: False)
    general = module._forward_cpu(*args)
    for result in (fast, banded):
        torch.testing.assert_close(result, general, rtol=2e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(result == BIG, general == BIG)
    assert torch.isnan(general).any()
    with np.errstate(invalid="ignore"):              # inf - inf in the reference
        reference = reference_im2dist(x, geometry, norm, remove_center, remove_bounds)
    np.testing.assert_allclose(general.double().numpy(), reference, rtol=1e-5, atol=1e-5,
                               equal_nan=True)
