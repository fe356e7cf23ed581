"""Review: layer corner cases the golden cases do not cover, each checked against a reference
written from the semantics notes as plain loops (pooling ceil/pad rules, Interp crop with
shrink/zoom, Im2dist/Im2parity with stride and oversized pad, DistLoss over a batch with
ignored taps, SoftmaxWithLoss normalisations on a non-channel axis, NormConvMeanfield with N > 1
and non-identity blobs)."""
import itertools
import math

import numpy as np
import pytest
import torch

from segaware_caffe.caffe_proto import read_net
from segaware_caffe import BuildContext
from segaware_caffe.layer import layer_class

FLT_MAX = np.float32(3.4028234663852886e38)
BIG = np.float32(3.4028234663852886e38 / 100)


def build(text, bottom_shapes, phase="TEST"):
    layer_param = read_net(f"layer {{ {text} }}").layer[0]
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase=phase,
                       bottom_shapes=[tuple(s) for s in bottom_shapes],
                       bottom_names=list(layer_param.bottom), top_names=list(layer_param.top))
    return layer_class(layer_param.type, layer_param.name).from_proto(layer_param, ctx)


def assert_close(got, ref, what, rel=1e-4, floor=1e-5):
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    err = np.abs(got - ref)
    assert (err <= rel * np.abs(ref) + floor * max(np.abs(ref).max(), 1.0)).all(), \
        f"{what}: max error {err.max():.3g}"


# ------------------------------------------------------------------------------------- Pooling
def pooling_reference(x, kernel, stride, pad, method):
    """(top, bottom gradient for a top gradient of ones) by SEMANTICS §9.1."""
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
    xt = torch.tensor(x, requires_grad=True)
    top = layer(xt)
    top.backward(torch.ones_like(top))
    assert_close(top, ref_top, "top")
    assert_close(xt.grad, ref_grad, "bottom diff")


# -------------------------------------------------------------------------------------- Interp
def interp_reference(x, out_h, out_w, pad_beg, pad_end):
    """Align-corners bilinear on the crop, float32 coefficients (SEMANTICS §6), and the
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
    xt = torch.tensor(x, requires_grad=True)
    top = layer(xt)
    top.backward(torch.ones_like(top))
    assert_close(top, ref_top, "top")
    assert_close(xt.grad, ref_grad, "bottom diff")


# ------------------------------------------------------------------------ Im2dist / Im2parity
def patch_positions(height, width, kernel, pad, stride, dilation):
    out_h = (height + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    out_w = (width + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    centre = (kernel // 2) * dilation
    for i, j, oh, ow in itertools.product(range(kernel), range(kernel), range(out_h), range(out_w)):
        ch, cw = oh * stride - pad + centre, ow * stride - pad + centre
        nh, nw = oh * stride - pad + i * dilation, ow * stride - pad + j * dilation
        yield (i * kernel + j, oh, ow, (i, j) == (kernel // 2,) * 2, (ch, cw), (nh, nw),
               0 <= ch < height and 0 <= cw < width, 0 <= nh < height and 0 <= nw < width,
               (out_h, out_w))


def im2dist_reference(x, grad_top, kernel, pad, stride, dilation, norm, remove_center,
                      remove_bounds):
    """Forward by §2.1; backward by the GPU rule (L1 sign(0) = 0) chosen in Decisions 2."""
    batch, _, height, width = x.shape
    top = grad = None
    for k, oh, ow, is_centre, (ch, cw), (nh, nw), centre_in, neigh_in, out in patch_positions(
            height, width, kernel, pad, stride, dilation):
        if top is None:
            top = np.zeros((batch, kernel * kernel) + out, np.float32)
            grad = np.zeros(x.shape)
        for n in range(batch):
            if not centre_in:
                continue
            if remove_center and is_centre:
                top[n, k, oh, ow] = BIG
            elif neigh_in:
                diff = x[n, :, ch, cw] - x[n, :, nh, nw]
                top[n, k, oh, ow] = np.abs(diff).sum() if norm == "L1" else (0.5 * diff * diff).sum()
                if not is_centre:
                    step = (np.sign(diff) if norm == "L1" else diff) * grad_top[n, k, oh, ow]
                    grad[n, :, ch, cw] += step
                    grad[n, :, nh, nw] -= step
            else:
                top[n, k, oh, ow] = BIG if remove_bounds else 0
    return top, grad


GEOMETRIES = [(3, 1, 2, 1), (3, 4, 1, 1), (3, 5, 2, 2), (4, 2, 3, 1), (5, 7, 2, 1), (3, 0, 3, 2)]


@pytest.mark.parametrize("kernel,pad,stride,dilation", GEOMETRIES)
@pytest.mark.parametrize("norm,remove_center,remove_bounds", [("L1", False, False),
                                                              ("L1", True, True),
                                                              ("L2", True, False)])
def test_im2dist_stride_and_oversized_pad(kernel, pad, stride, dilation, norm, remove_center,
                                          remove_bounds):
    rng = np.random.default_rng(2)
    x = rng.integers(-2, 3, (2, 3, 7, 8)).astype(np.float32)   # small integers: exact ties
    flags = f"remove_center: {str(remove_center).lower()} remove_bounds: {str(remove_bounds).lower()}"
    layer = build(f'name: "d" type: "Im2dist" bottom: "x" top: "y" convolution_param {{ '
                  f'kernel_size: {kernel} pad: {pad} stride: {stride} dilation: {dilation} }} '
                  f'im2dist_param {{ norm: {norm} {flags} }}', [x.shape])
    xt = torch.tensor(x, requires_grad=True)
    top = layer(xt)
    grad_top = rng.standard_normal(tuple(top.shape)).astype(np.float32)
    top.backward(torch.tensor(grad_top))
    ref_top, ref_grad = im2dist_reference(x, grad_top, kernel, pad, stride, dilation, norm,
                                          remove_center, remove_bounds)
    assert_close(top, ref_top, "top")
    assert_close(xt.grad, ref_grad, "bottom diff")


@pytest.mark.parametrize("kernel,pad,stride,dilation", GEOMETRIES)
@pytest.mark.parametrize("ignore_label", [None, 255])
def test_im2parity_stride_and_oversized_pad(kernel, pad, stride, dilation, ignore_label):
    rng = np.random.default_rng(3)
    labels = (rng.choice([0, 1, 2, 255], (2, 2, 7, 8))
              + rng.choice([0.0, 0.5], (2, 2, 7, 8))).astype(np.float32)
    extra = "" if ignore_label is None else f"im2parity_param {{ ignore_label: {ignore_label} }}"
    layer = build(f'name: "q" type: "Im2parity" bottom: "x" top: "y" convolution_param {{ '
                  f'kernel_size: {kernel} pad: {pad} stride: {stride} dilation: {dilation} }} '
                  f'{extra}', [labels.shape])
    fill = 0 if ignore_label is None else ignore_label
    ref = None
    for k, oh, ow, _, (ch, cw), (nh, nw), centre_in, neigh_in, out in patch_positions(
            7, 8, kernel, pad, stride, dilation):
        if ref is None:
            ref = np.zeros((2, kernel * kernel) + out, np.float32)
        for n in range(2):
            if not centre_in:
                ref[n, k, oh, ow] = fill
                continue
            for c in range(2):                      # the last channel wins
                centre = int(labels[n, c, ch, cw])
                neighbour = int(labels[n, c, nh, nw]) if neigh_in else 0
                if ignore_label is not None and ignore_label in (centre, neighbour):
                    ref[n, k, oh, ow] = ignore_label
                else:
                    ref[n, k, oh, ow] = float(centre == neighbour)
    assert_close(layer(torch.tensor(labels)), ref, "top", rel=0, floor=0)


# ------------------------------------------------------------------------------------- DistLoss
def test_dist_loss_batch_with_ignored_taps_and_loss_weight():
    rng = np.random.default_rng(4)
    dist = rng.uniform(0, 3, (3, 9, 4, 5)).astype(np.float32)
    parity = rng.choice([0, 1, 255], dist.shape).astype(np.float32)
    layer = build('name: "l" type: "DistLoss" bottom: "d" bottom: "p" top: "l" convolution_param '
                  '{ kernel_size: 3 } dist_loss_param { alpha: 0.5 beta: 2 ignore_label: 255 }',
                  [dist.shape, parity.shape])
    margin = np.where(parity == 255, 0, np.where(parity != 0, np.maximum(dist - 0.5, 0),
                                                 np.maximum(2 - dist, 0)))
    dt = torch.tensor(dist, requires_grad=True)
    loss = layer(dt, torch.tensor(parity))
    (3 * loss).backward()                    # loss_weight 3: the original ignores it in backward
    assert_close(loss, margin.sum() / dist.size, "loss")
    assert_close(dt.grad, np.where(parity != 0, margin, -margin) / dist.size, "diff")


# ------------------------------------------------------------------------------ SoftmaxWithLoss
@pytest.mark.parametrize("loss_param,mode", [
    ("normalization: FULL", "FULL"), ("normalization: VALID", "VALID"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"), ("normalization: NONE", "NONE"),
    ("normalize: false", "BATCH_SIZE"), ("normalize: false normalization: FULL", "FULL"), ("", "VALID"),
])
@pytest.mark.parametrize("shape,axis,label_shape", [((2, 4, 3, 5), 1, (2, 1, 3, 5)),
                                                    ((2, 3, 4, 5), -2, (2, 3, 1, 5))])
def test_softmax_loss_normalisation_on_any_axis(loss_param, mode, shape, axis, label_shape):
    rng = np.random.default_rng(5)
    ax = axis % len(shape)
    channels, outer, inner = shape[ax], math.prod(shape[:ax]), math.prod(shape[ax + 1:])
    x = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, channels, label_shape).astype(np.float32)
    labels.reshape(-1)[::3] = 255
    layer = build(f'name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l" '
                  f'softmax_param {{ axis: {axis} }} loss_param {{ {loss_param} ignore_label: 255 }}',
                  [shape, label_shape])
    scores = x.reshape(outer, channels, inner).astype(np.float64)
    prob = np.exp(scores - scores.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    label = labels.reshape(outer, inner).astype(int)
    valid = label != 255
    loss, grad = 0.0, prob.copy()
    for o, i in itertools.product(range(outer), range(inner)):
        if valid[o, i]:
            loss -= np.log(prob[o, label[o, i], i])
            grad[o, label[o, i], i] -= 1
        else:
            grad[o, :, i] = 0
    normalizer = max(1, {"FULL": outer * inner, "VALID": valid.sum(), "BATCH_SIZE": outer,
                         "NONE": 1}[mode])
    xt = torch.tensor(x, requires_grad=True)
    out = layer(xt, torch.tensor(labels))
    (2 * out).backward()
    assert_close(out, loss / normalizer, "loss")
    assert_close(xt.grad, (2 * grad / normalizer).reshape(shape), "scores diff")


# ---------------------------------------------------------------------------- NormConvMeanfield
def _softmax(a, axis):
    e = np.exp(a - a.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def meanfield_message(q, feat, kernel, pad, dilation, scale):
    """One image's message (remove flags true): sum_k softmax_k(-scale * D)[k, p] * Q[p + o_k]."""
    channels, height, width = q.shape
    dist = None
    for k, oh, ow, is_centre, (ch, cw), (nh, nw), centre_in, neigh_in, out in patch_positions(
            height, width, kernel, pad, 1, dilation):
        if dist is None:
            dist = np.zeros((kernel * kernel,) + out)
        if centre_in and (is_centre or not neigh_in):
            dist[k, oh, ow] = BIG
        elif centre_in:
            diff = feat[:, ch, cw].astype(np.float64) - feat[:, nh, nw]
            dist[k, oh, ow] = (0.5 * diff * diff).sum()
    attention = _softmax(-scale * dist, 0)
    message = np.zeros((channels,) + dist.shape[1:])
    for k, oh, ow, _, _, (nh, nw), _, neigh_in, _ in patch_positions(
            height, width, kernel, pad, 1, dilation):
        if neigh_in:
            message[:, oh, ow] += attention[k, oh, ow] * q[:, nh, nw]
    return message


def test_normconv_meanfield_batch_with_learned_blobs():
    rng = np.random.default_rng(6)
    batch, channels, height, width = 2, 3, 7, 8
    unary, q0 = (rng.standard_normal((batch, channels, height, width)).astype(np.float32)
                 for _ in range(2))
    bilateral = rng.standard_normal((batch, 4, height, width)).astype(np.float32)
    spatial = rng.standard_normal((batch, 2, height, width)).astype(np.float32)
    layer = build('name: "c" type: "NormConvMeanfield" bottom: "u" bottom: "q" bottom: "b" '
                  'bottom: "s" top: "c" norm_conv_meanfield_param { num_iterations: 3 '
                  'remove_center: true remove_bounds: true remove_center: true remove_bounds: true '
                  'kernel_size: 3 pad: 2 dilation: 2 scale: 0.7 '
                  'kernel_size: 5 pad: 2 dilation: 1 scale: 1.5 }',
                  [unary.shape, q0.shape, bilateral.shape, spatial.shape])
    blobs = [rng.standard_normal((channels, channels)).astype(np.float32) for _ in range(3)]
    with torch.no_grad():
        for parameter, value in zip(layer.caffe_blobs(), blobs):
            parameter.copy_(torch.tensor(value).reshape(1, 1, channels, channels))
    w_spatial, w_bilateral, compat = blobs
    ref = np.zeros(unary.shape)
    for n in range(batch):
        x = q0[n].astype(np.float64)
        for _ in range(3):
            q = _softmax(x, 0)
            s = meanfield_message(q, spatial[n], 5, 2, 1, 1.5)
            b = meanfield_message(q, bilateral[n], 3, 2, 2, 0.7)
            m = np.einsum("ab,bhw->ahw", w_spatial, s) + np.einsum("ab,bhw->ahw", w_bilateral, b)
            x = unary[n] - np.einsum("ab,bhw->ahw", compat, m)
        ref[n] = x
    got = layer(*(torch.tensor(a) for a in (unary, q0, bilateral, spatial)))
    assert_close(got, ref, "top")
