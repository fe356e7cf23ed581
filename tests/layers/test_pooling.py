"""Pooling against Caffe's loops: the ceil rule with its pad correction, clipped windows, the
AVE divisor, MAX routing and ties, global pooling."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segaware_caffe.layers.pooling import pooled_size

from tests.layers.helpers import build, check_top_and_gradient, randn
from tests.tolerances import assert_close


FLT_MAX = np.float32(3.4028234663852886e38)


def pooling_reference(x, kernel, stride, pad, method):
    """(top, bottom gradient for a top gradient of ones) by Caffe's pooling loops: ceil rule, the
    last window dropped when it starts past the padded end (if the layer pads at all), windows
    clipped to the image, AVE dividing by the window size clipped to the padded image."""
    _, _, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    out_h = int(math.ceil((height + 2 * ph - kh) / sh)) + 1
    out_w = int(math.ceil((width + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        out_h -= (out_h - 1) * sh >= height + ph
        out_w -= (out_w - 1) * sw >= width + pw
    top = np.zeros(x.shape[:2] + (out_h, out_w), np.float32)
    grad = np.zeros(x.shape)
    for n, c, oh, ow in itertools.product(*map(range, top.shape)):
        hs, ws = oh * sh - ph, ow * sw - pw
        if method == "MAX":
            best, where = -FLT_MAX, None
            for h in range(max(hs, 0), min(hs + kh, height)):
                for w in range(max(ws, 0), min(ws + kw, width)):
                    if x[n, c, h, w] > best:
                        best, where = x[n, c, h, w], (h, w)
            top[n, c, oh, ow] = best
            if where:
                grad[n, c, where[0], where[1]] += 1
        else:
            he, we = min(hs + kh, height + ph), min(ws + kw, width + pw)
            size = (he - hs) * (we - ws)
            rows, cols = slice(max(hs, 0), min(he, height)), slice(max(ws, 0), min(we, width))
            top[n, c, oh, ow] = x[n, c, rows, cols].sum() / size
            grad[n, c, rows, cols] += 1.0 / size
    return top, grad


POOL_GEOMETRIES = [  # (H, W, kernel, stride, pad)
    (10, 11, (3, 3), (2, 2), (1, 1)),   # ceil keeps a 6th row
    (9, 12, (3, 3), (2, 2), (1, 1)),
    (7, 7, (2, 2), (4, 4), (0, 0)),     # stride > kernel without pad: the last window is empty
    (6, 9, (3, 2), (2, 1), (2, 1)),     # non-square, stride (2, 1), correction on both axes
    (8, 5, (4, 3), (3, 2), (1, 0)),     # pad on one axis corrects both
    (5, 5, (5, 5), (1, 1), (0, 0)),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("geometry", POOL_GEOMETRIES, ids=str)
def test_pooling_matches_caffe_loops(method, geometry):
    h, w, kernel, stride, pad = geometry
    layer = build(f'name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ pool: {method} '
                  f'kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} '
                  f'stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]} }}', [(2, 3, h, w)])
    x = randn(2, 3, h, w, dtype=torch.float32)
    ref, _ = pooling_reference(x.double().numpy(), kernel, stride, pad, method)
    got = layer(x)
    assert got.shape == ref.shape
    assert_close(got, ref, "top")
    assert layer.output_shapes([(2, 3, h, w)]) == [ref.shape]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("size,kernel,stride,pad", [
    ((7, 8), (3, 3), (2, 2), (1, 1)),
    ((6, 9), (3, 2), (2, 3), (1, 0)),     # one padded axis: the last-window rule acts on both
    ((8, 5), (4, 3), (3, 2), (2, 1)),
    ((5, 7), (2, 2), (2, 2), (1, 1)),
    ((9, 6), (3, 3), (1, 1), (1, 1)),
    ((4, 4), (3, 3), (2, 2), (0, 0)),
    ((1, 2), (3, 3), (2, 2), (1, 1)),     # kernel larger than the image
])
def test_pooling_ceil_and_border_rules(method, size, kernel, stride, pad):
    x = np.random.default_rng(0).standard_normal((2, 3) + size).astype(np.float32)
    layer = build(f'name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ pool: {method} '
                  f'kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} '
                  f'stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]} }}', [x.shape])
    ref_top, ref_grad = pooling_reference(x, kernel, stride, pad, method)
    check_top_and_gradient(layer, x, ref_top, ref_grad)


def test_pooling_ceil_rule_vs_torch_ceil_mode():
    # With padding, torch's ceil_mode output equals Caffe's ...
    for size, k, s, p in itertools.product(range(3, 14), (2, 3, 4), (1, 2, 3), (1,)):
        if p < k and size + 2 * p >= k:
            x = torch.zeros(1, 1, size, size)
            ours = F.max_pool2d(x, k, s, p, ceil_mode=True).shape[-1]
            assert pooled_size(size, k, p, s) == ours, (size, k, s, p)
    # ... without padding torch also drops a window starting outside the image, Caffe does not.
    assert pooled_size(7, 2, 0, 4) == 3
    assert F.max_pool2d(torch.zeros(1, 1, 7, 7), 2, 4, ceil_mode=True).shape[-1] == 2


@pytest.mark.parametrize("geometry", [g for g in POOL_GEOMETRIES if any(g[4]) and all(
    2 * p <= k for p, k in zip(g[4], g[2]))], ids=str)
def test_pooling_with_padding_equals_torch_ceil_mode(geometry):
    # That equivalence holds whenever the layer pads (the pad correction is then
    # torch's) and pad <= kernel/2 (torch refuses larger pads, which Caffe allows up to kernel-1).
    h, w, kernel, stride, pad = geometry
    x = randn(2, 3, h, w, dtype=torch.float32)
    for method, torch_pool in (("MAX", torch.nn.MaxPool2d(kernel, stride, pad, ceil_mode=True)),
                               ("AVE", torch.nn.AvgPool2d(kernel, stride, pad, ceil_mode=True,
                                                          count_include_pad=True))):
        layer = build(f'name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ '
                      f'pool: {method} kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: '
                      f'{stride[0]} stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]} }}',
                      [(2, 3, h, w)])
        torch.testing.assert_close(layer(x), torch_pool(x))


def test_pooling_gradients_route_like_caffe():
    layer = build('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE '
                  'kernel_size: 3 stride: 2 pad: 1 }', [(1, 1, 6, 6)])
    x = torch.ones(1, 1, 6, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == (1, 1, 4, 4)
    assert y[0, 0, 0, 0].item() == pytest.approx(4 / 9) and y[0, 0, 3, 3].item() == pytest.approx(1 / 4)
    y.sum().backward()
    # each window spreads g / pool_size over its in-image elements
    ref = torch.zeros(6, 6, dtype=torch.float64)
    sizes = [3, 3, 3, 2]
    for oh, ow in itertools.product(range(4), range(4)):
        hs, ws = oh * 2 - 1, ow * 2 - 1
        for i, j in itertools.product(range(max(hs, 0), min(hs + 3, 6)), range(max(ws, 0), min(ws + 3, 6))):
            ref[i, j] += 1 / (sizes[oh] * sizes[ow])
    torch.testing.assert_close(x.grad[0, 0].double(), ref, rtol=1e-6, atol=1e-7)


def test_max_pooling_mask_top_and_ties():
    layer = build('name: "p" type: "Pooling" bottom: "x" top: "y" top: "mask" pooling_param { '
                  'pool: MAX kernel_size: 2 stride: 2 pad: 1 }', [(1, 1, 3, 4)])
    x = torch.tensor([[[[1., 1., 0., 5.], [2., 2., 0., 0.], [0., 7., 7., 3.]]]], requires_grad=True)
    y, mask = layer(x)
    assert y.tolist() == [[[[1., 1., 5.], [2., 7., 3.]]]]
    # first element of a tie in row-major order wins; indices are h*W + w
    assert mask.tolist() == [[[[0., 1., 3.], [4., 9., 11.]]]]
    y.sum().backward()
    assert x.grad.tolist() == [[[[1., 1., 0., 1.], [1., 0., 0., 0.], [0., 1., 0., 1.]]]]


def test_global_pooling_follows_input_size():
    layer = build('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE '
                  'global_pooling: true }', [(2, 3, 5, 4)])
    for shape in [(2, 3, 5, 4), (1, 2, 7, 3)]:
        x = randn(*shape)
        torch.testing.assert_close(layer(x), x.mean(dim=(2, 3), keepdim=True))
