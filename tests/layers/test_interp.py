"""Interp (DeepLab): the size rules, align-corners values on the cropped bottom, the
transposed backward."""
import itertools

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.caffe_proto import read_net

from tests.layers.helpers import build, check_top_and_gradient, randn
from tests.tolerances import assert_close


def interp_reference(x, out_h, out_w, pad_beg, pad_end):
    """Align-corners bilinear on the crop, float32 coefficients, and the
    gradient for a top gradient of ones."""
    in_h, in_w = x.shape[2] + pad_beg + pad_end, x.shape[3] + pad_beg + pad_end
    off = -pad_beg
    crop = x[:, :, off:off + in_h, off:off + in_w]
    top = np.zeros(x.shape[:2] + (out_h, out_w), np.float32)
    grad = np.zeros(x.shape)
    ratio_h = np.float32(in_h - 1) / np.float32(out_h - 1) if out_h > 1 else np.float32(0)
    ratio_w = np.float32(in_w - 1) / np.float32(out_w - 1) if out_w > 1 else np.float32(0)
    for oh, ow in itertools.product(range(out_h), range(out_w)):
        hr, wr = np.float32(ratio_h * oh), np.float32(ratio_w * ow)
        h1, w1 = int(hr), int(wr)
        hp, wp = int(h1 < in_h - 1), int(w1 < in_w - 1)
        lh, lw = np.float32(hr - h1), np.float32(wr - w1)
        taps = ((h1, w1, (1 - lh) * (1 - lw)), (h1, w1 + wp, (1 - lh) * lw),
                (h1 + hp, w1, lh * (1 - lw)), (h1 + hp, w1 + wp, lh * lw))
        for h, w, weight in taps:
            top[:, :, oh, ow] += weight * crop[:, :, h, w]
            grad[:, :, off + h, off + w] += weight
    return top, grad


@pytest.mark.parametrize("params, in_hw, out_hw", [
    ("shrink_factor: 2", (17, 16), (9, 8)),
    ("zoom_factor: 3", (5, 4), (13, 10)),
    ("zoom_factor: 2 height: 3 width: 3", (5, 4), (9, 7)),           # zoom wins over height/width
    ("height: 6 width: 11 shrink_factor: 2 zoom_factor: 3", (5, 4), (6, 11)),  # size beats both
    ("shrink_factor: 4 zoom_factor: 3", (513, 513), (385, 385)),
    ("shrink_factor: 2 pad_beg: -1 pad_end: -1", (9, 12), (4, 5)),
    ("height: 1 width: 1", (4, 5), (1, 1)),
    ("height: 5 width: 6", (5, 6), (5, 6)),                           # same size: a copy
])
def test_interp_size_rules_and_values(params, in_hw, out_hw):
    layer = build(f'name: "i" type: "Interp" bottom: "x" top: "y" interp_param {{ {params} }}',
                  [(1, 2, *in_hw)])
    assert layer.output_shapes([(1, 2, *in_hw)]) == [(1, 2, *out_hw)]
    if in_hw[0] > 100:
        return
    x = randn(1, 2, *in_hw, dtype=torch.float32)
    proto = read_net(f'layer {{ interp_param {{ {params} }} }}').layer[0].interp_param
    ref, _ = interp_reference(x.double().numpy(), *out_hw, proto.pad_beg, proto.pad_end)
    assert_close(layer(x), ref, "top")


@pytest.mark.parametrize("params,size", [       # sizes worked out by hand for a 13x11 bottom
    ("shrink_factor: 4 zoom_factor: 3 pad_beg: -1 pad_end: -2", (7, 4)),
    ("zoom_factor: 4 shrink_factor: 3 pad_beg: -2 pad_end: -1", (13, 9)),
    ("shrink_factor: 2 pad_beg: -1 pad_end: 0", (6, 5)),
    ("zoom_factor: 3 height: 4 width: 4 pad_beg: 0 pad_end: -1", (34, 28)),   # zoom beats size
    ("shrink_factor: 2 zoom_factor: 3 height: 5 width: 6 pad_beg: -1 pad_end: -1", (5, 6)),
    ("height: 1 width: 4 pad_beg: -1 pad_end: -1", (1, 4)),
])
def test_interp_crop_with_size_rules(params, size):
    x = np.random.default_rng(1).standard_normal((2, 3, 13, 11)).astype(np.float32)
    layer = build(f'name: "i" type: "Interp" bottom: "x" top: "y" interp_param {{ {params} }}',
                  [x.shape])
    pad_beg, pad_end = layer.pad_beg, layer.pad_end
    ref_top, ref_grad = interp_reference(x, *size, pad_beg, pad_end)
    check_top_and_gradient(layer, x, ref_top, ref_grad)


def test_interp_backward_is_the_transpose():
    layer = build('name: "i" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 3 '
                  'pad_beg: -1 pad_end: 0 }', [(1, 1, 4, 5)]).double()
    x, probe = randn(1, 1, 4, 5), randn(1, 1, 7, 10, seed=1)
    x.requires_grad_(True)
    (layer(x) * probe).sum().backward()
    assert not x.grad[0, 0, 0].any() and not x.grad[0, 0, :, 0].any()   # cropped row/column
    torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("param", ["zoom_factor: 3", "shrink_factor: 3", "height: 9 width: 13",
                                   "zoom_factor: 2 pad_beg: -1 pad_end: -2", "height: 1 width: 5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_resize_and_its_transpose_are_torchs(param, dtype, monkeypatch):
    """On the CPU the layer resizes through compiled loops (kernels/cpu/interp.c) and takes
    their transpose as its backward: torch's bilinear resize and its gradient within rounding
    (the same weights, the gradient accumulated in the same order), a float64 gradcheck, and
    torch's own code where the loops are switched off."""
    import segaware_caffe.kernels._native as native
    from segaware_caffe.layers import interp as interp_module
    layer = sc.Net(f'name: "t" input: "data" input_shape {{ dim: 2 dim: 3 dim: 10 dim: 11 }}\n'
                   f'layer {{ name: "up" type: "Interp" bottom: "data" top: "up" '
                   f'interp_param {{ {param} }} }}', dtype=dtype).layers["up"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, 11, generator=gen, dtype=dtype, requires_grad=True)
    grad = torch.randn(layer(x).shape, generator=gen, dtype=dtype)
    if native._compiler() is not None and native.ENABLED:
        assert interp_module._CompiledBilinear.applies(x, -layer.pad_beg, 1, 1)
    top = layer(x)
    (got,) = torch.autograd.grad(top, x, grad)
    with monkeypatch.context() as patch:
        patch.setattr(native, "ENABLED", False)
        expected_top = layer(x)
        (expected,) = torch.autograd.grad(expected_top, x, grad)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(top, expected_top, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)
