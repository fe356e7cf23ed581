"""DeepLab's layers in the fork: UniqueLabel, BiasChannel, AdaptiveBiasChannel, DomainTransform,
DomainTransformForwardOnly and NospConvMeanfield (DenseCRF has tests/layers/test_densecrf.py).

References are written from the definitions with Python loops (float64 unless the original's
float32 rounding is the point), at parameters and shapes other than the golden cases'; gradients
by float64 gradcheck where the original's backward is the true derivative, and against a loop
transcription of the original's backward where it is not (DomainTransform's clamped weights).
"""
import math
import warnings

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import LayerSetupError
from segaware_caffe.caffe_proto import read_net
from segaware_caffe.errors import NoBackwardError
from segaware_caffe.kernels.domain_transform import domain_transform
from tests.layers.helpers import build
from segaware_caffe.layers.adaptive_bias_channel import GlibcRand, random_shuffle


def rng(seed):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------- UniqueLabel
def unique_label_reference(labels, max_labels, ignore, force):
    n = labels.shape[0]
    top = -np.ones((n, max_labels, 1, 1), np.float32)
    for i in range(n):
        vals = {float(v) for v in labels[i].ravel() if int(v) not in ignore} | {float(v) for v in force}
        vals = sorted(vals)
        top[i, :len(vals), 0, 0] = vals
    return top


def test_unique_label_matches_set_reference():
    r = rng(1)
    labels = r.integers(0, 6, size=(4, 1, 5, 3)).astype(np.float32)
    labels[0, 0, 0, :] = 255
    labels[1, 0, 1, 1] = 254.6          # int() -> 254, ignored
    labels[2] = 255                      # only the forced label remains
    layer = build('name: "u" type: "UniqueLabel" bottom: "l" top: "t" '
                  'unique_label_param { max_labels: 9 ignore_label: 255 ignore_label: 254 '
                  'force_label: 7.5 force_label: 0 }', [labels.shape])
    got = layer(torch.from_numpy(labels)).numpy()
    ref = unique_label_reference(labels, 9, {255, 254}, [7.5, 0])
    np.testing.assert_array_equal(got, ref)
    assert got[2].ravel().tolist() == [0, 7.5] + [-1] * 7


def test_unique_label_many_images_at_once():
    """A batch of images with different numbers of labels, fractional values and repeats of the
    forced label: each row as the per-image set gives it."""
    r = rng(2)
    labels = r.integers(0, 9, size=(300, 1, 4, 5)).astype(np.float32)
    labels[::3] = np.minimum(labels[::3], 2)                  # few labels in some images
    labels[1::7, 0, 0, 0] = 3.25
    labels[2::5, 0, 1, :] = 255
    layer = build('name: "u" type: "UniqueLabel" bottom: "l" top: "t" '
                  'unique_label_param { max_labels: 12 ignore_label: 255 force_label: 4 }',
                  [labels.shape])
    got = layer(torch.from_numpy(labels)).numpy()
    np.testing.assert_array_equal(got, unique_label_reference(labels, 12, {255}, [4]))


def test_unique_label_errors():
    text = 'name: "u" type: "UniqueLabel" bottom: "l" top: "t" unique_label_param { %s }'
    with pytest.raises(LayerSetupError, match="max_labels is required"):
        build(text % "ignore_label: 1", [(1, 1, 2, 2)])
    with pytest.raises(LayerSetupError, match="max_labels must be > the number of distinct force_label"):
        build(text % "max_labels: 2 force_label: 1 force_label: 2", [(1, 1, 2, 2)])
    with pytest.raises(LayerSetupError, match=r"labels of shape \(N, 1, H, W\)"):
        build(text % "max_labels: 2", [(1, 2, 2, 2)])
    layer = build(text % "max_labels: 2", [(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="image 0 has 3 distinct labels"):
        layer(torch.tensor([[[[0.0, 1.0], [2.0, 2.0]]]]))


# ------------------------------------------------------------------------------- BiasChannel
def bias_image_reference(x, labels, bg, fg, ignore):
    y = x.copy()
    for n in range(x.shape[0]):
        for v in labels[n].ravel():
            label = int(v)
            if label in ignore or label == -1:
                continue
            y[n, label] += bg if label == 0 else fg
    return y


def bias_pixel_reference(x, labels, bg, fg, ignore, background):
    y = x.copy()
    n_, _, h_, w_ = x.shape
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                label = int(labels[n, 0, h, w])
                if label in ignore or label == -1:
                    continue
                if background is not None:
                    y[n, background, h, w] += bg
                    if label != background:
                        y[n, label, h, w] += fg
                else:
                    y[n, label, h, w] += fg
    return y


def test_bias_channel_image_labels():
    r = rng(2)
    x = r.standard_normal((3, 6, 2, 3))
    labels = np.array([[0, 3, 3, -1, 5], [2, 9, -1, -1, -1], [-1, -1, -1, -1, -1]],
                      np.float64).reshape(3, 5, 1, 1)
    layer = build('name: "b" type: "BiasChannel" bottom: "x" bottom: "l" top: "y" '
                  'bias_channel_param { bg_bias: 0.25 fg_bias: 3 ignore_label: 9 }',
                  [x.shape, labels.shape])
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt, torch.tensor(labels))
    np.testing.assert_allclose(y.detach().numpy(), bias_image_reference(x, labels, 0.25, 3, {9}), rtol=0, atol=1e-15)
    g = torch.tensor(r.standard_normal(x.shape))
    (gx,) = torch.autograd.grad(y, xt, g)
    assert torch.equal(gx, g)           # identity backward


@pytest.mark.parametrize("params, background", [
    ("bg_bias: 0.5 fg_bias: 1.5 ignore_label: 255 background_label: 2", 2),
    ("fg_bias: 1.5 ignore_label: 255", None),           # neither field given: no background
    ("bg_bias: 0.75 ignore_label: 255", 0),             # bg_bias given: background 0
])
def test_bias_channel_pixel_labels(params, background):
    r = rng(3)
    x = r.standard_normal((2, 4, 3, 5))
    labels = r.integers(0, 4, size=(2, 1, 3, 5)).astype(np.float64)
    labels[0, 0, 0, :2] = 255
    labels[1, 0, 2, 4] = -1
    layer = build('name: "b" type: "BiasChannel" bottom: "x" bottom: "l" top: "y" '
                  f'bias_channel_param {{ {params} label_type: PIXEL }}', [x.shape, labels.shape])
    y = layer(torch.tensor(x), torch.tensor(labels)).numpy()
    p = read_net('layer { bias_channel_param { %s } }' % params).layer[0].bias_channel_param
    ref = bias_pixel_reference(x, labels, p.bg_bias, p.fg_bias, {255}, background)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-15)


def test_bias_channel_errors_and_label_gradient():
    text = 'name: "b" type: "BiasChannel" bottom: "x" bottom: "l" top: "y" bias_channel_param { %s }'
    with pytest.raises(LayerSetupError, match="bg_bias and fg_bias must be >= 0"):
        build(text % "fg_bias: -1", [(1, 3, 2, 2), (1, 2, 1, 1)])
    with pytest.raises(LayerSetupError, match=r"IMAGE labels must have shape \(N, L, 1, 1\)"):
        build(text % "bg_bias: 1", [(1, 3, 2, 2), (1, 1, 2, 2)])
    with pytest.raises(LayerSetupError, match=r"PIXEL labels must have shape \(N, 1, H, W\)"):
        build(text % "label_type: PIXEL", [(1, 3, 2, 2), (1, 2, 1, 1)])
    with pytest.raises(LayerSetupError, match="background_label must be a channel, 0..2, got 3"):
        build(text % "label_type: PIXEL background_label: 3", [(1, 3, 2, 2), (1, 1, 2, 2)])
    layer = build(text % "bg_bias: 1", [(1, 3, 2, 2), (1, 2, 1, 1)])
    with pytest.raises(ValueError, match="unexpected label 3: expected 0..2"):
        layer(torch.zeros(1, 3, 2, 2), torch.tensor([3.0, 0.0]).reshape(1, 2, 1, 1))
    net = sc.Net('input: "x" input_shape { dim: 1 dim: 3 dim: 2 dim: 2 } '
                 'input: "l" input_shape { dim: 1 dim: 2 dim: 1 dim: 1 } '
                 'layer { name: "b" type: "BiasChannel" bottom: "x" bottom: "l" top: "y" }')
    labels = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1).requires_grad_()
    y = net.forward(x=torch.zeros(1, 3, 2, 2), l=labels)["y"]
    with pytest.raises(NoBackwardError, match=r"b \(BiasChannel\) cannot backpropagate into bottom 1"):
        y.sum().backward()


# ----------------------------------------------------------------------- AdaptiveBiasChannel
def test_glibc_rand_sequence_and_shuffle():
    r = GlibcRand()
    # the first rand() values of a glibc process that never called srand()
    assert [r() for _ in range(5)] == [1804289383, 846930886, 1681692777, 1714636915, 1957747793]
    r = GlibcRand()
    # libstdc++: i = 1 -> j = 1804289383 % 2 = 1 (stay); i = 2 -> j = 846930886 % 3 = 1 (swap)
    assert random_shuffle([10, 20, 30], r) == [10, 30, 20]
    assert random_shuffle([7], r) == [7] and r() == 1681692777   # one item draws nothing


def adaptive_reference(x, labels, num_iter, bg_portion, fg_portion, suppress, margin, orders=None):
    """float32 loops after the original's Forward_cpu; `orders` gives, per image, the label
    order of every iteration (default: sorted, background first)."""
    x = x.astype(np.float32).copy()
    n_, c_, h_, w_ = x.shape
    s = h_ * w_
    for n in range(n_):
        present = sorted(int(v) for v in labels[n].ravel() if int(v) != -1)
        if not present:
            continue
        top = x[n].reshape(c_, s)
        if suppress:
            mn = np.full(s, np.finfo(np.float32).max, np.float32)
            for c in set(present):
                mn = np.minimum(mn, top[c])
            for c in range(c_):
                if c not in present:
                    for i in range(s):
                        if top[c, i] > mn[i]:
                            top[c, i] = np.float32(mn[i] - np.float32(margin))
        ext = top[present[0]].copy()
        for c in present[1:]:
            ext = np.maximum(ext, top[c])
        mean0 = float(np.sum(ext.astype(np.float64))) / s
        for t in range(num_iter):
            order = orders[n][t] if orders else present
            for label in order:
                diff = (ext - top[label]).astype(np.float32)
                portion = bg_portion if label == 0 else fg_portion
                nth = min(int(np.float32(portion) * np.float32(s)), s - 1)
                top[label] = top[label] + np.sort(diff)[nth]
                ext = np.maximum(ext, top[label])
        mean1 = float(np.sum(ext.astype(np.float64))) / s
        top += np.float32(mean0 - mean1)
    return x


@pytest.mark.parametrize("params, args", [
    ("num_iter: 2 bg_portion: 0.45 fg_portion: 0.1", (2, 0.45, 0.1, True, 1e-5)),
    ("num_iter: 4 bg_portion: 0.3 fg_portion: 0.35 suppress_others: false", (4, 0.3, 0.35, False, 1e-5)),
    ("num_iter: 1 bg_portion: 1 fg_portion: 0 margin_others: 0.5", (1, 1.0, 0.0, True, 0.5)),
])
def test_adaptive_bias_channel_one_foreground(params, args):
    r = rng(4)
    x = r.standard_normal((3, 5, 7, 3)).astype(np.float32)
    # at most one distinct foreground label per image: the visiting order is fixed
    labels = np.array([[0, 3, -1], [4, 4, -1], [-1, -1, -1]], np.float32).reshape(3, 3, 1, 1)
    layer = build(f'name: "a" type: "AdaptiveBiasChannel" bottom: "x" bottom: "l" top: "y" '
                  f'adaptive_bias_channel_param {{ {params} }}', [x.shape, labels.shape])
    got = layer(torch.from_numpy(x), torch.from_numpy(labels)).numpy()
    ref = adaptive_reference(x, labels, *args)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[2], x[2])        # no label: unchanged


def test_adaptive_bias_channel_several_foregrounds_follow_glibc_rand():
    r = rng(5)
    x = r.standard_normal((1, 5, 4, 6)).astype(np.float32)
    labels = np.array([0, 1, 3, 4], np.float32).reshape(1, 4, 1, 1)
    layer = build('name: "a" type: "AdaptiveBiasChannel" bottom: "x" bottom: "l" top: "y" '
                  'adaptive_bias_channel_param { num_iter: 2 bg_portion: 0.4 fg_portion: 0.25 }',
                  [x.shape, labels.shape])
    got = layer(torch.from_numpy(x), torch.from_numpy(labels)).numpy()
    # the orders libstdc++'s random_shuffle gives with rand() = 1804289383, 846930886 (iteration
    # 1: [1, 3, 4] -> i=1 stays, i=2 swaps with 1 -> [1, 4, 3]) and 1681692777, 1714636915
    # (iteration 2 on [1, 4, 3]: i=1 -> j=1 stays; i=2 -> j=1714636915 % 3 = 1 -> [1, 3, 4])
    orders = [[[0, 1, 4, 3], [0, 1, 3, 4]]]
    ref = adaptive_reference(x, labels, 2, 0.4, 0.25, True, 1e-5, orders)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # a new layer starts the sequence again; this one continues it, as the process-wide rand() does
    fresh = build('name: "a" type: "AdaptiveBiasChannel" bottom: "x" bottom: "l" top: "y" '
                  'adaptive_bias_channel_param { num_iter: 2 bg_portion: 0.4 fg_portion: 0.25 }',
                  [x.shape, labels.shape])
    np.testing.assert_array_equal(fresh(torch.from_numpy(x), torch.from_numpy(labels)).numpy(), got)
    assert layer.rand() == 1957747793               # four numbers drawn: the fifth comes next


def test_adaptive_bias_channel_errors():
    text = ('name: "a" type: "AdaptiveBiasChannel" bottom: "x" bottom: "l" top: "y" '
            'adaptive_bias_channel_param { %s }')
    shapes = [(1, 3, 2, 2), (1, 2, 1, 1)]
    with pytest.raises(LayerSetupError, match="num_iter must be > 0"):
        build(text % "num_iter: 0", shapes)
    with pytest.raises(LayerSetupError, match=r"fg_portion must be in \[0, 1\]"):
        build(text % "fg_portion: 1.5", shapes)
    with pytest.raises(LayerSetupError, match="margin_others must be >= 0"):
        build(text % "margin_others: -1", shapes)
    with pytest.raises(LayerSetupError, match="C > 1"):
        build(text % "num_iter: 1", [(1, 1, 2, 2), (1, 2, 1, 1)])
    layer = build(text % "num_iter: 1", shapes)
    with pytest.raises(ValueError, match="unexpected label 5"):
        layer(torch.zeros(1, 3, 2, 2), torch.tensor([0.0, 5.0]).reshape(1, 2, 1, 1))
    assert layer.HAS_BACKWARD is False


# --------------------------------------------------------------------------- DomainTransform
def dt_constants(num_iter, ss, rs):
    s, r = np.float32(ss), np.float32(rs)
    m2 = np.float32(s / r)
    m1 = [np.float32(-math.sqrt(2.0) / float(np.float32(float(s) * math.sqrt(3.0) * 2.0 ** (num_iter - i - 1)
                                                         / math.sqrt(4.0 ** num_iter - 1))))
          for i in range(num_iter)]
    return m1, m2


def dt_weights(g, ih, iw, m1, m2, min_weight):
    w = np.zeros_like(g)
    for h in range(ih):
        for x in range(iw):
            w[h, x] = min(max(math.exp(m1 * (1 + g[h, x] * m2)), min_weight), 1.0)
    return w


def dt_reference(x, g, dims, num_iter, ss, rs, min_weight, grad=None):
    """Loop transcription of the original's Forward_cpu / Backward_cpu in float64."""
    m1s, m2 = dt_constants(num_iter, ss, rs)
    m1s, m2 = [float(v) for v in m1s], float(m2)
    min_weight = float(np.float32(min_weight))       # a float field of the original
    n_, c_, h_, w_ = x.shape
    y = x.copy()
    inters = np.zeros((num_iter, 4) + x.shape)
    for n in range(n_):
        ih, iw = int(dims[n].ravel()[0]), int(dims[n].ravel()[1])
        for it in range(num_iter):
            wt = dt_weights(g[n, 0], ih, iw, m1s[it], m2, min_weight)
            for c in range(c_):
                o, inter = y[n, c], inters[it, :, n, c]
                for h in range(ih):
                    for x_ in range(1, iw):
                        inter[0, h, x_] = o[h, x_ - 1] - o[h, x_]
                        o[h, x_] += wt[h, x_] * inter[0, h, x_]
                    for x_ in range(iw - 2, -1, -1):
                        inter[1, h, x_] = o[h, x_ + 1] - o[h, x_]
                        o[h, x_] += wt[h, x_ + 1] * inter[1, h, x_]
                for x_ in range(iw):
                    for h in range(1, ih):
                        inter[2, h, x_] = o[h - 1, x_] - o[h, x_]
                        o[h, x_] += wt[h, x_] * inter[2, h, x_]
                    for h in range(ih - 2, -1, -1):
                        inter[3, h, x_] = o[h + 1, x_] - o[h, x_]
                        o[h, x_] += wt[h + 1, x_] * inter[3, h, x_]
    if grad is None:
        return y
    gx = grad.copy()
    gg = np.zeros_like(g)
    for n in range(n_):
        ih, iw = int(dims[n].ravel()[0]), int(dims[n].ravel()[1])
        for it in range(num_iter - 1, -1, -1):
            wt = dt_weights(g[n, 0], ih, iw, m1s[it], m2, min_weight)
            wd = np.zeros((h_, w_))
            for c in range(c_):
                o, inter = gx[n, c], inters[it, :, n, c]
                for x_ in range(iw):
                    for h in range(ih - 1):
                        wd[h + 1, x_] += o[h, x_] * inter[3, h, x_]
                        o[h + 1, x_] += wt[h + 1, x_] * o[h, x_]
                        o[h, x_] *= 1 - wt[h + 1, x_]
                    for h in range(ih - 1, 0, -1):
                        wd[h, x_] += o[h, x_] * inter[2, h, x_]
                        o[h - 1, x_] += wt[h, x_] * o[h, x_]
                        o[h, x_] *= 1 - wt[h, x_]
                for h in range(ih):
                    for x_ in range(iw - 1):
                        wd[h, x_ + 1] += o[h, x_] * inter[1, h, x_]
                        o[h, x_ + 1] += wt[h, x_ + 1] * o[h, x_]
                        o[h, x_] *= 1 - wt[h, x_ + 1]
                    for x_ in range(iw - 1, 0, -1):
                        wd[h, x_] += o[h, x_] * inter[0, h, x_]
                        o[h, x_ - 1] += wt[h, x_] * o[h, x_]
                        o[h, x_] *= 1 - wt[h, x_]
            for h in range(ih):
                for x_ in range(iw):
                    # mult1 * mult2 is a product of two floats in the original
                    gg[n, 0, h, x_] += float(np.float32(m1s[it]) * np.float32(m2)) * wd[h, x_] * wt[h, x_]
    return y, gx, gg


DT_CASES = [  # (num_iter, spatial_sigma, range_sigma, min_weight, dims)
    (1, 3.0, 1.5, 0.0, [(5, 6), (3, 4)]),
    (3, 10.0, 4.0, 0.2, [(4, 6), (5, 2)]),       # min_weight clamps part of the weights
    (2, 50.0, 5.0, 0.0, [(9, 9), (0, 3)]),       # dims may exceed nothing, or be empty
]


@pytest.mark.parametrize("num_iter, ss, rs, mw, dims", DT_CASES)
def test_domain_transform_forward_and_backward_match_loops(num_iter, ss, rs, mw, dims):
    r = rng(6)
    shape = (2, 3, 5, 6)
    x = r.standard_normal(shape)
    g = np.abs(r.standard_normal((2, 1, 5, 6))) * 2
    d = np.array(dims, np.float64).reshape(2, 2, 1, 1)
    d = np.minimum(d, [[[[5]], [[6]]]])
    grad = r.standard_normal(shape)
    ref_y, ref_gx, ref_gg = dt_reference(x, g, d, num_iter, ss, rs, mw, grad)
    xt, gt = torch.tensor(x, requires_grad=True), torch.tensor(g, requires_grad=True)
    y = domain_transform(xt, gt, torch.tensor(d), num_iter=num_iter, spatial_sigma=ss,
                         range_sigma=rs, min_weight=mw)
    gx, gg = torch.autograd.grad(y, (xt, gt), torch.tensor(grad))
    np.testing.assert_allclose(y.detach().numpy(), ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx.numpy(), ref_gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gg.numpy(), ref_gg, rtol=1e-10, atol=1e-12)
    # outside the valid region: a copy of x, an identity gradient, no reference gradient
    ih, iw = int(d[1, 0, 0, 0]), int(d[1, 1, 0, 0])
    np.testing.assert_array_equal(y.detach().numpy()[1, :, ih:], x[1, :, ih:])
    np.testing.assert_array_equal(gg.numpy()[1, :, ih:], 0)


def test_domain_transform_gradcheck_where_the_weights_are_not_clamped():
    r = rng(7)
    x = torch.tensor(r.standard_normal((2, 2, 4, 5)), requires_grad=True)
    g = torch.tensor(np.abs(r.standard_normal((2, 1, 4, 5))), requires_grad=True)
    dims = torch.tensor([[4.0, 5.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    # g >= 0 and min_weight 0: exp(...) lies in (0, 1], the clamp is inactive and the original's
    # gradient is the true derivative
    fn = lambda a, b: domain_transform(a, b, dims, num_iter=2, spatial_sigma=4.0, range_sigma=2.0)
    assert torch.autograd.gradcheck(fn, (x, g))


def test_domain_transform_layers_and_errors():
    text = ('name: "dt" type: "%s" bottom: "x" bottom: "g" bottom: "d" top: "y" '
            'domain_transform_param { %s }')
    shapes = [(2, 3, 4, 5), (2, 1, 4, 5), (2, 2, 1, 1)]
    for bad, match in (("spatial_sigma: 0", "spatial_sigma must be > 0"),
                       ("range_sigma: -1", "range_sigma must be > 0"),
                       ("min_weight: -0.1", "min_weight must be >= 0"),
                       ("num_iter: 0", "num_iter must be > 0")):
        with pytest.raises(LayerSetupError, match=match):
            build(text % ("DomainTransform", bad), shapes)
    with pytest.raises(LayerSetupError, match="reference gradient"):
        build(text % ("DomainTransform", "num_iter: 1"), [(2, 3, 4, 5), (2, 2, 4, 5), (2, 2, 1, 1)])
    with pytest.raises(LayerSetupError, match="valid sizes"):
        build(text % ("DomainTransform", "num_iter: 1"), [(2, 3, 4, 5), (2, 1, 4, 5), (2, 1, 1, 1)])
    layer = build(text % ("DomainTransformForwardOnly", "num_iter: 2 min_weight: 0.1"), shapes)
    full = build(text % ("DomainTransform", "num_iter: 2 min_weight: 0.1"), shapes)
    x, g = torch.randn(2, 3, 4, 5), torch.rand(2, 1, 4, 5)
    dims = torch.tensor([[4.0, 5.0], [2.0, 3.0]]).reshape(2, 2, 1, 1)
    assert torch.equal(layer(x, g, dims), full(x, g, dims))
    assert not layer.HAS_BACKWARD and full.HAS_BACKWARD and full.NO_GRAD_BOTTOMS == (2,)
    with pytest.raises(ValueError, match=r"at most the blob's \(4, 5\)"):
        full(x, g, torch.tensor([[5.0, 5.0], [2.0, 3.0]]).reshape(2, 2, 1, 1))
    net = sc.Net('input: "x" input_shape { dim: 1 dim: 1 dim: 3 dim: 3 } '
                 'input: "g" input_shape { dim: 1 dim: 1 dim: 3 dim: 3 } '
                 'input: "d" input_shape { dim: 1 dim: 2 dim: 1 dim: 1 } '
                 'layer { name: "dt" type: "DomainTransformForwardOnly" bottom: "x" bottom: "g" '
                 'bottom: "d" top: "y" }')
    y = net.forward(x=torch.randn(1, 1, 3, 3).requires_grad_(), g=torch.rand(1, 1, 3, 3),
                    d=torch.tensor([3.0, 3.0]).reshape(1, 2, 1, 1))["y"]
    with pytest.raises(NoBackwardError, match=r"dt \(DomainTransformForwardOnly\) has no backward"):
        y.sum().backward()


# ------------------------------------------------------------------------- NospConvMeanfield
def nosp_reference(u, q0, f, blob1, iters, kernel, pad, dilation, scale, remove_center, remove_bounds):
    """float64 loops: X <- U - K (K B(softmax X)), B the NormConv message of the features."""
    n_, c_, h_, w_ = u.shape
    big = float(np.float32(np.finfo(np.float32).max / 100))
    k = blob1.reshape(c_, c_)
    x = q0.copy()
    offs = [(i * dilation - pad, j * dilation - pad) for i in range(kernel) for j in range(kernel)]
    centre = (kernel // 2) * kernel + kernel // 2
    for _ in range(iters):
        e = np.exp(x - x.max(1, keepdims=True))
        q = e / e.sum(1, keepdims=True)
        msg = np.zeros_like(u)
        for n in range(n_):
            for h in range(h_):
                for w in range(w_):
                    ch, cw = h - pad + (kernel // 2) * dilation, w - pad + (kernel // 2) * dilation
                    dist = []
                    for t, (dh, dw) in enumerate(offs):
                        hh, ww = h + dh, w + dw
                        inside = 0 <= hh < h_ and 0 <= ww < w_
                        if remove_center and t == centre:
                            dist.append(big)
                        elif not inside:
                            dist.append(big if remove_bounds else 0.0)
                        else:
                            dist.append(0.5 * np.sum((f[n, :, ch, cw] - f[n, :, hh, ww]) ** 2))
                    logits = -scale * np.array(dist)
                    a = np.exp(logits - logits.max())
                    a /= a.sum()
                    for t, (dh, dw) in enumerate(offs):
                        hh, ww = h + dh, w + dw
                        if 0 <= hh < h_ and 0 <= ww < w_:
                            msg[n, :, h, w] += a[t] * q[n, :, hh, ww]
        x = u - np.einsum("ab,nbhw->nahw", k, np.einsum("ab,nbhw->nahw", k, msg))
    return x


def test_nosp_conv_meanfield_matches_reference():
    r = rng(8)
    u, q0 = r.standard_normal((2, 3, 6, 7)), r.standard_normal((2, 3, 6, 7))
    f = r.standard_normal((2, 2, 6, 7))
    layer = build('name: "crf" type: "NospConvMeanfield" bottom: "u" bottom: "q" bottom: "f" top: "x" '
                  'norm_conv_meanfield_param { num_iterations: 3 kernel_size: 3 pad: 2 dilation: 2 '
                  'scale: 0.7 remove_center: false remove_bounds: true }',
                  [u.shape, q0.shape, f.shape]).double()
    with torch.no_grad():
        layer.compatibility.copy_(torch.tensor(r.standard_normal((1, 1, 3, 3))))
        layer.bilateral_weight.copy_(torch.tensor(r.standard_normal((1, 1, 3, 3))))
        got = layer(torch.tensor(u), torch.tensor(q0), torch.tensor(f)).numpy()
    ref = nosp_reference(u, q0, f, layer.compatibility.detach().numpy(), 3, 3, 2, 2, float(np.float32(0.7)),
                         False, True)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    assert [name for name in layer.CAFFE_BLOBS] == ["bilateral_weight", "compatibility"]
    assert layer.HAS_BACKWARD is False


def test_nosp_conv_meanfield_defaults_and_errors():
    text = ('name: "crf" type: "NospConvMeanfield" bottom: "u" bottom: "q" bottom: "f" top: "x" '
            'norm_conv_meanfield_param { %s }')
    shapes = [(1, 2, 4, 4), (1, 2, 4, 4), (1, 3, 4, 4)]
    with pytest.raises(LayerSetupError, match="num_iterations must be >= 2"):
        build(text % "num_iterations: 1 kernel_size: 3", shapes)
    with pytest.raises(LayerSetupError, match="kernel_size is required"):
        build(text % "num_iterations: 2", shapes)
    with pytest.raises(LayerSetupError, match="pad must be given 0 or 1 times"):
        build(text % "num_iterations: 2 kernel_size: 3 pad: 1 pad: 1 dilation: 1 scale: 1", shapes)
    with pytest.raises(LayerSetupError, match="would read past it"):
        build(text % "num_iterations: 2 kernel_size: 3 dilation: 1 scale: 1", shapes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = build(text % "num_iterations: 2 kernel_size: 3", shapes)
    said = " ".join(str(w.message) for w in caught)
    assert "dilation not given" in said and "scale not given" in said
    # dilation 0 and pad 0: every tap reads the pixel itself, the grid is H x W, the message is
    # softmax(X) whatever the (uniform, scale 0) attention, and with K = -I: X <- U - softmax(X)
    assert layer.bilateral.dilation == 0 and layer.bilateral.scale == 0.0
    u, q0 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        got = layer(u, q0, torch.randn(1, 3, 4, 4))
    x = q0
    for _ in range(2):
        x = u - torch.softmax(x, 1)        # K = -I twice: K K = I
    torch.testing.assert_close(got, x)


def test_nosp_conv_meanfield_refuses_gradients():
    net = sc.Net('input: "u" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 } '
                 'input: "q" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 } '
                 'input: "f" input_shape { dim: 1 dim: 1 dim: 3 dim: 3 } '
                 'layer { name: "crf" type: "NospConvMeanfield" bottom: "u" bottom: "q" bottom: "f" '
                 'top: "x" norm_conv_meanfield_param { num_iterations: 2 kernel_size: 3 pad: 1 '
                 'dilation: 1 scale: 1 } }')
    feeds = dict(u=torch.randn(1, 2, 3, 3), q=torch.randn(1, 2, 3, 3), f=torch.randn(1, 1, 3, 3))
    # its blobs learn by default (lr_mult 1): their gradient is refused
    with pytest.raises(NoBackwardError, match=r"crf \(NospConvMeanfield\) has no backward.*learnable blobs"):
        net.forward(**feeds)["x"].sum().backward()
    for p in net.parameters():
        p.requires_grad_(False)
    feeds["u"].requires_grad_()
    with pytest.raises(NoBackwardError, match=r"crf \(NospConvMeanfield\) has no backward.*'u'"):
        net.forward(**feeds)["x"].sum().backward()
