"""Standard layers, group A: Convolution, Deconvolution, InnerProduct, Im2col, Pooling, Interp,
LRN, BatchNorm, Scale, Bias, DummyData, PReLU.

Golden cases are run layer by layer (built from the case prototxt, fed `in/*`, weights from
`param/*`), forward and backward; the remaining tests use references written from the maths.
"""
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segaware_caffe.caffe_proto import caffe_pb2, read_net
from segaware_caffe import BuildContext, LayerSetupError
from segaware_caffe.layer import layer_class
from segaware_caffe.layers.pooling import pooled_size

GOLDEN_CASES = [
    "conv_bottom_is_im2col", "conv_dilated_k3d2", "conv_group2", "deconv_k4s2_group",
    "filler_bilinear_deconv", "innerproduct", "im2col_k3p1", "im2col_k3p2d2", "im2col_k5s2p2",
    "pool_ave_k3s2_border", "pool_global_ave", "pool_max_k2s2_odd", "pool_max_k3s2p1_ceil",
    "interp_hw_explicit", "interp_shrink2", "interp_zoom2", "interp_zoom2_padbeg_padend",
    "interp_zoom4", "lrn_across", "lrn_within", "batchnorm_globalstats_then_scale",
    "scale_bias_axis1", "scale_scalar_numaxes0", "dummydata_const_multi", "dummydata_xy_1x2x5x6",
    "dummydata_xy_1x2x7x9",
]


def assert_close(got, ref, what):
    """Golden tolerance: |got - ref| <= 1e-4 |ref| + 1e-5 max|ref|, elementwise."""
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, float)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    scale = np.abs(ref).max() if ref.size else 0.0
    err = np.abs(got - ref)
    bad = err > 1e-4 * np.abs(ref) + 1e-5 * scale
    if bad.any():
        index = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} elements off, max abs error {err.max():.3g} "
                             f"at {index} (got {got[index]}, expected {ref[index]})")
    return float(err.max()) if err.size else 0.0


def build(layer_param, bottom_shapes, phase="TEST"):
    if isinstance(layer_param, str):
        layer_param = read_net(f"layer {{ {layer_param} }}").layer[0]
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase=phase,
                       bottom_shapes=[tuple(s) for s in bottom_shapes],
                       bottom_names=list(layer_param.bottom), top_names=list(layer_param.top))
    return layer_class(layer_param.type, layer_param.name).from_proto(layer_param, ctx)


def as_tuple(tops):
    return (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_case(golden, case):
    root = golden / "layers" / case
    net = read_net(root / "net.prototxt")
    meta = json.loads((root / "meta.json").read_text())
    data = np.load(root / "data.npz")
    blobs = {name: torch.tensor(data[f"in/{name}"], requires_grad=True) for name in net.input}
    inputs = dict(blobs)
    params = {}       # (layer, index) -> Parameter, for layers whose blobs learn (lr_mult != 0)
    for lp in net.layer:
        layer = build(lp, [blobs[b].shape for b in lp.bottom], meta["phase"])
        for index, blob in enumerate(layer.caffe_blobs()):
            stored = data[f"param/{lp.name}/{index}"]
            if lp.type == "Deconvolution" and "filler" in case:
                assert_close(blob, stored, f"{lp.name} blob {index} as filled")
            with torch.no_grad():
                blob.copy_(torch.from_numpy(stored).reshape(blob.shape))
            lr_mult = lp.param[index].lr_mult if index < len(lp.param) else 1.0
            if lr_mult != 0:
                params[lp.name, index] = blob
        tops = as_tuple(layer(*[blobs[b] for b in lp.bottom]))
        if lp.type == "DummyData":
            # Net-level rule (SEMANTICS §11.6): Net::Forward zeroes element 0 of every net output
            # before the layers run; a constant DummyData top is never rewritten, so it keeps it.
            tops = [top.clone().view(-1).index_fill_(0, torch.tensor([0]), 0).view(top.shape)
                    if spec.type == "constant" and name in meta["outputs"] else top
                    for top, spec, name in zip(tops, layer.fillers, lp.top)]
        blobs.update(zip(lp.top, tops))
    for name, value in blobs.items():
        assert_close(value, data[f"out/{name}"], f"{case}: out/{name}")
    if not meta["backward"]:
        return
    seeded = sum((blobs[name] * torch.from_numpy(data[f"topdiff/{name}"])).sum()
                 for name in meta["outputs"])
    wrt = list(inputs.values()) + list(params.values())
    grads = torch.autograd.grad(seeded, wrt, allow_unused=True)
    for (name, tensor), grad in zip(list(inputs.items()) + list(params.items()), grads):
        if isinstance(name, tuple):
            key = f"paramdiff/{name[0]}/{name[1]}"
        else:
            key = f"diff/{name}"
        assert_close(torch.zeros_like(tensor) if grad is None else grad, data[key], f"{case}: {key}")


# ------------------------------------------------------------------------------------------------
# References written from the maths (float64, plain loops over small sizes)

def conv_reference(x, weight, bias, stride, pad, dilation, group):
    n, c, h, w = x.shape
    out_c, c_per_group, kh, kw = weight.shape
    out_h = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    y = np.zeros((n, out_c, out_h, out_w))
    for b, o, oh, ow in itertools.product(range(n), range(out_c), range(out_h), range(out_w)):
        g = o // (out_c // group)
        total = bias[o] if bias is not None else 0.0
        for ci, i, j in itertools.product(range(c_per_group), range(kh), range(kw)):
            ih = oh * stride[0] - pad[0] + i * dilation[0]
            iw = ow * stride[1] - pad[1] + j * dilation[1]
            if 0 <= ih < h and 0 <= iw < w:
                total += weight[o, ci, i, j] * x[b, g * c_per_group + ci, ih, iw]
        y[b, o, oh, ow] = total
    return y


def pool_reference(x, method, kernel, stride, pad, round_mode=0):
    """Caffe's pooling loops: ceil rule, pad correction, clipped windows, AVE divisor."""
    n, c, h, w = x.shape
    padded = any(pad)
    out_h = pooled_size(h, kernel[0], pad[0], stride[0], round_mode, padded)
    out_w = pooled_size(w, kernel[1], pad[1], stride[1], round_mode, padded)
    y = np.zeros((n, c, out_h, out_w))
    for oh, ow in itertools.product(range(out_h), range(out_w)):
        hs, ws = oh * stride[0] - pad[0], ow * stride[1] - pad[1]
        he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
        pool_size = (he - hs) * (we - ws)
        window = x[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
        if method == "MAX":
            y[:, :, oh, ow] = window.max(axis=(2, 3)) if window.size else -np.finfo(np.float32).max
        else:
            y[:, :, oh, ow] = window.sum(axis=(2, 3)) / pool_size
    return y


def interp_reference(x, out_h, out_w, pad_beg=0, pad_end=0):
    """DeepLab's loops: align-corners ratios in float32, crop offset -pad_beg on both axes."""
    in_h = x.shape[2] + pad_beg + pad_end
    in_w = x.shape[3] + pad_beg + pad_end
    crop = x[:, :, -pad_beg:-pad_beg + in_h, -pad_beg:-pad_beg + in_w]
    ratio_h = np.float32(in_h - 1) / np.float32(out_h - 1) if out_h > 1 else np.float32(0)
    ratio_w = np.float32(in_w - 1) / np.float32(out_w - 1) if out_w > 1 else np.float32(0)
    y = np.zeros(x.shape[:2] + (out_h, out_w))
    for oh, ow in itertools.product(range(out_h), range(out_w)):
        src_h, src_w = np.float32(ratio_h * oh), np.float32(ratio_w * ow)
        h1, w1 = int(src_h), int(src_w)
        lh, lw = float(src_h - h1), float(src_w - w1)
        h1p, w1p = int(h1 < in_h - 1), int(w1 < in_w - 1)
        y[:, :, oh, ow] = ((1 - lh) * ((1 - lw) * crop[:, :, h1, w1] + lw * crop[:, :, h1, w1 + w1p])
                           + lh * ((1 - lw) * crop[:, :, h1 + h1p, w1]
                                   + lw * crop[:, :, h1 + h1p, w1 + w1p]))
    return y


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Convolution family

AWKWARD_CONV = ('name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { '
                'num_output: 4 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 '
                'pad_w: 0 dilation: 2 dilation: 1 weight_filler { type: "gaussian" } '
                'bias_filler { type: "gaussian" } }')


def test_convolution_awkward_geometry_matches_reference():
    layer = build(AWKWARD_CONV, [(1, 6, 9, 7)]).double()
    assert tuple(layer.weight.shape) == (4, 3, 3, 2)
    x = randn(1, 6, 9, 7)
    ref = conv_reference(x.numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy(),
                         (2, 1), (1, 0), (2, 1), 2)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    assert layer.float().output_shapes([(1, 6, 9, 7)]) == [ref.shape]


def test_convolution_default_fillers_are_zero_and_blob_order():
    layer = build('name: "c" type: "Convolution" bottom: "x" top: "y" '
                  'convolution_param { num_output: 3 kernel_size: 1 }', [(1, 2, 4, 4)])
    weight, bias = layer.caffe_blobs()
    assert weight.shape == (3, 2, 1, 1) and bias.shape == (3,)
    assert not weight.any() and not bias.any()
    no_bias = build('name: "c" type: "Convolution" bottom: "x" top: "y" '
                    'convolution_param { num_output: 3 kernel_size: 1 bias_term: false }', [(1, 2, 4, 4)])
    assert len(no_bias.caffe_blobs()) == 1


def test_convolution_several_bottoms_share_weights():
    layer = build('name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "ya" top: "yb" '
                  'convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } }',
                  [(1, 2, 5, 5), (1, 2, 5, 5)])
    a, b = randn(1, 2, 5, 5, dtype=torch.float32), randn(1, 2, 5, 5, seed=1, dtype=torch.float32)
    ya, yb = layer(a, b)
    torch.testing.assert_close(ya, layer(a))
    torch.testing.assert_close(yb, layer(b))


def test_bottom_is_im2col_equals_convolution_on_im2col():
    conv = build(AWKWARD_CONV, [(2, 6, 9, 7)]).double()
    columns = build('name: "i" type: "Im2col" bottom: "x" top: "col" convolution_param { '
                    'kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 '
                    'dilation: 2 dilation: 1 }', [(2, 6, 9, 7)])
    x = randn(2, 6, 9, 7)
    col = columns(x)
    assert col.shape == (2, 36, 4, 6)
    on_columns = build('name: "c" type: "Convolution" bottom: "col" top: "y" convolution_param { '
                       'num_output: 4 group: 2 kernel_h: 3 kernel_w: 2 stride: 5 pad: 7 '
                       'bottom_is_im2col: true }', [tuple(col.shape)]).double()
    assert on_columns.weight.shape == conv.weight.shape
    with torch.no_grad():
        on_columns.weight.copy_(conv.weight)
        on_columns.bias.copy_(conv.bias)
    torch.testing.assert_close(on_columns(col), conv(x), rtol=1e-12, atol=1e-12)


def test_deconvolution_is_the_adjoint_of_convolution():
    geometry = 'kernel_h: 4 kernel_w: 3 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 2 dilation: 2 group: 2'
    deconv = build(f'name: "d" type: "Deconvolution" bottom: "x" top: "y" convolution_param {{ '
                   f'num_output: 6 bias_term: false {geometry} weight_filler {{ type: "gaussian" }} }}',
                   [(2, 4, 5, 4)]).double()
    assert deconv.weight.shape == (4, 3, 4, 3)
    x = randn(2, 4, 5, 4)
    y = deconv(x)
    # s*(H-1) + d*(k-1)+1 - 2p
    assert y.shape == (2, 6, 2 * 4 + 7 - 2, 3 * 3 + 5 - 4)
    conv = build(f'name: "c" type: "Convolution" bottom: "y" top: "x" convolution_param {{ '
                 f'num_output: 4 bias_term: false {geometry} }}', [tuple(y.shape)]).double()
    with torch.no_grad():
        conv.weight.copy_(deconv.weight)
    probe = randn(*y.shape, seed=3)
    assert conv(probe).shape == x.shape
    torch.testing.assert_close((y * probe).sum(), (x * conv(probe)).sum())


def test_inner_product_axis_and_transpose():
    plain = build('name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { '
                  'num_output: 5 axis: 2 weight_filler { type: "gaussian" } bias_filler { '
                  'type: "constant" value: 0.5 } }', [(2, 3, 4, 6)]).double()
    assert plain.weight.shape == (5, 24)
    x = randn(2, 3, 4, 6)
    ref = x.reshape(6, 24) @ plain.weight.detach().t() + 0.5
    torch.testing.assert_close(plain(x), ref.reshape(2, 3, 5))
    transposed = build('name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { '
                       'num_output: 5 axis: -3 transpose: true }', [(2, 3, 4, 6)])
    assert transposed.weight.shape == (72, 5)
    with torch.no_grad():
        transposed.weight.copy_(randn(72, 5, dtype=torch.float32))
    ref = x.float().reshape(2, 72) @ transposed.weight.detach()
    torch.testing.assert_close(transposed(x.float()), ref)


def test_im2col_channel_order():
    layer = build('name: "i" type: "Im2col" bottom: "x" top: "col" convolution_param { '
                  'kernel_h: 2 kernel_w: 3 pad: 1 stride_h: 1 stride_w: 2 }', [(1, 2, 4, 5)])
    x = randn(1, 2, 4, 5)
    col = layer(x)
    assert col.shape == (1, 12, 5, 3)
    padded = F.pad(x, (1, 1, 1, 1))
    for c, i, j in itertools.product(range(2), range(2), range(3)):
        expected = padded[0, c, i:i + 5, j:j + 5:2]
        torch.testing.assert_close(col[0, c * 6 + i * 3 + j], expected)


# ------------------------------------------------------------------------------------------------
# Pooling

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
    ref = pool_reference(x.double().numpy(), method, kernel, stride, pad)
    got = layer(x)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert layer.output_shapes([(2, 3, h, w)]) == [ref.shape]


def test_pooling_ceil_rule_vs_torch_ceil_mode():
    # With padding, torch's ceil_mode output equals Caffe's (SEMANTICS §9.1) ...
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
    # SEMANTICS §9.1's equivalence holds whenever the layer pads (the pad correction is then
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


# ------------------------------------------------------------------------------------------------
# Interp

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
    ref = interp_reference(x.double().numpy(), *out_hw, proto.pad_beg, proto.pad_end)
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_interp_backward_is_the_transpose():
    layer = build('name: "i" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 3 '
                  'pad_beg: -1 pad_end: 0 }', [(1, 1, 4, 5)]).double()
    x, probe = randn(1, 1, 4, 5), randn(1, 1, 7, 10, seed=1)
    x.requires_grad_(True)
    (layer(x) * probe).sum().backward()
    assert not x.grad[0, 0, 0].any() and not x.grad[0, 0, :, 0].any()   # cropped row/column
    torch.autograd.gradcheck(layer, (x,))


# ------------------------------------------------------------------------------------------------
# LRN

def test_lrn_across_channels_reference():
    layer = build('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 3 '
                  'alpha: 0.6 beta: 0.8 k: 1.5 }', [(2, 5, 3, 4)]).double()
    x = randn(2, 5, 3, 4)
    ref = torch.empty_like(x)
    for c in range(5):
        window = x[:, max(c - 1, 0):c + 2]
        ref[:, c] = x[:, c] * (1.5 + 0.6 / 3 * (window ** 2).sum(1)) ** -0.8
    torch.testing.assert_close(layer(x), ref)
    torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)


def test_lrn_within_channel_reference():
    layer = build('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 3 '
                  'alpha: 0.6 beta: 0.8 k: 7 norm_region: WITHIN_CHANNEL }', [(1, 2, 4, 5)]).double()
    x = randn(1, 2, 4, 5)
    padded = F.pad(x ** 2, (1, 1, 1, 1))
    ref = torch.empty_like(x)
    for i, j in itertools.product(range(4), range(5)):
        ref[:, :, i, j] = x[:, :, i, j] * (1 + 0.6 * padded[:, :, i:i + 3, j:j + 3].sum((2, 3)) / 9) ** -0.8
    torch.testing.assert_close(layer(x), ref)
    torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)


# ------------------------------------------------------------------------------------------------
# BatchNorm

BN = 'name: "bn" type: "BatchNorm" bottom: "x" top: "y"'


def test_batch_norm_use_global_stats_default_follows_phase():
    assert build(BN, [(2, 3, 4, 4)], phase="TEST").use_global_stats
    assert not build(BN, [(2, 3, 4, 4)], phase="TRAIN").use_global_stats
    forced = build(BN + ' batch_norm_param { use_global_stats: true }', [(2, 3, 4, 4)], phase="TRAIN")
    assert forced.use_global_stats
    assert [tuple(b.shape) for b in forced.caffe_blobs()] == [(3,), (3,), (1,)]
    assert not any(b.any() for b in forced.caffe_blobs())


def test_batch_norm_unloaded_layer_scales_by_one_over_sqrt_eps():
    layer = build(BN, [(1, 2, 3, 3)])
    x = randn(1, 2, 3, 3, dtype=torch.float32)
    torch.testing.assert_close(layer(x), x / math.sqrt(1e-5))
    assert layer(x)[0, 0, 0, 0].item() == pytest.approx(x[0, 0, 0, 0].item() * 316.2278, rel=1e-5)


def test_batch_norm_global_stats_forward_and_backward():
    layer = build(BN + ' batch_norm_param { eps: 0.01 }', [(2, 3, 4, 5)])
    mean, var, factor = torch.tensor([1., -2., 0.5]), torch.tensor([4., 0.25, 1.]), 2.5
    with torch.no_grad():
        layer.mean_sum.copy_(mean * factor)
        layer.variance_sum.copy_(var * factor)
        layer.scale_factor.fill_(factor)
    x = randn(2, 3, 4, 5, dtype=torch.float32).requires_grad_(True)
    std = torch.sqrt(var + 0.01).reshape(1, 3, 1, 1)
    y = layer(x)
    torch.testing.assert_close(y, (x - mean.reshape(1, 3, 1, 1)) / std)
    probe = randn(2, 3, 4, 5, seed=1, dtype=torch.float32)
    grads = torch.autograd.grad((y * probe).sum(), [x, *layer.caffe_blobs()], allow_unused=True)
    torch.testing.assert_close(grads[0], probe / std)
    assert all(g is None for g in grads[1:])


def test_batch_norm_batch_mode_persistent_divisor_quirk():
    layer = build(BN, [(2, 2, 3, 3)], phase="TRAIN")
    x = randn(2, 2, 3, 3, dtype=torch.float32).requires_grad_(True)
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    expected = 0.0
    for _ in range(4):           # 0.00316, 0.0563, 0.237, 0.487 (SEMANTICS Appendix B)
        expected = math.sqrt(expected + 1e-5)
        y = layer(x)
        divisor = (centred / y).detach()
        assert divisor.min().item() == pytest.approx(expected, rel=1e-4)
        assert divisor.max().item() == pytest.approx(expected, rel=1e-4)
    assert expected == pytest.approx(0.487, abs=5e-4)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 1 / expected), rtol=1e-4, atol=0)
    assert not any(b.any() for b in layer.caffe_blobs())   # accumulators untouched


def test_batch_norm_update_global_stats_in_train():
    layer = build(BN + ' batch_norm_param { use_global_stats: true update_global_stats: true '
                  'moving_average_fraction: 0.5 }', [(2, 2, 3, 3)], phase="TRAIN")
    with torch.no_grad():
        layer.mean_sum.copy_(torch.tensor([2., 4.]))
        layer.variance_sum.copy_(torch.tensor([6., 8.]))
        layer.scale_factor.fill_(2.)
    x = randn(2, 2, 3, 3)
    layer.double()
    y = layer(x)
    mean = torch.tensor([1., 2.], dtype=torch.float64)
    var = ((x - mean.reshape(1, 2, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(y, (x - mean.reshape(1, 2, 1, 1)) / torch.sqrt(var + 1e-5).reshape(1, 2, 1, 1))
    torch.testing.assert_close(layer.scale_factor.detach(), torch.tensor([2.], dtype=torch.float64))
    torch.testing.assert_close(layer.mean_sum.detach(), mean + 0.5 * torch.tensor([2., 4.], dtype=torch.float64))
    torch.testing.assert_close(layer.variance_sum.detach(),
                               18 / 17 * var + 0.5 * torch.tensor([6., 8.], dtype=torch.float64))
    # TEST phase ignores update_global_stats
    frozen = build(BN + ' batch_norm_param { update_global_stats: true }', [(2, 2, 3, 3)])
    frozen(randn(2, 2, 3, 3, dtype=torch.float32))
    assert not frozen.scale_factor.any()


# ------------------------------------------------------------------------------------------------
# Scale, Bias, PReLU

def test_scale_num_axes_variants():
    shapes = {"num_axes: -1": (3, 4, 5), "num_axes: 0": (), "num_axes: 2 axis: -3": (3, 4),
              "axis: 0 num_axes: 1": (2,)}
    for params, blob_shape in shapes.items():
        layer = build(f'name: "s" type: "Scale" bottom: "x" top: "y" scale_param {{ {params} '
                      f'filler {{ type: "gaussian" }} }}', [(2, 3, 4, 5)]).double()
        assert tuple(layer.scale.shape) == blob_shape, params
        x = randn(2, 3, 4, 5)
        axis = layer.axis
        view = (1,) * axis + blob_shape + (1,) * (4 - axis - len(blob_shape))
        torch.testing.assert_close(layer(x), x * layer.scale.detach().reshape(view))
        torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)


def test_scale_fillers_and_blobs():
    default = build('name: "s" type: "Scale" bottom: "x" top: "y" scale_param { bias_term: true }',
                    [(2, 3)])
    assert default.scale.tolist() == [1., 1., 1.] and default.bias.tolist() == [0., 0., 0.]
    empty_filler = build('name: "s" type: "Scale" bottom: "x" top: "y" scale_param { filler {} '
                         'bias_term: true bias_filler { value: 2 } }', [(2, 3)])
    assert empty_filler.scale.tolist() == [0., 0., 0.] and empty_filler.bias.tolist() == [2., 2., 2.]
    two_bottoms = build('name: "s" type: "Scale" bottom: "x" bottom: "g" top: "y" scale_param { '
                        'bias_term: true }', [(2, 3, 4), (3, 4)])
    assert [tuple(b.shape) for b in two_bottoms.caffe_blobs()] == [(3, 4)]


def test_scale_two_bottoms_gradients():
    layer = build('name: "s" type: "Scale" bottom: "x" bottom: "g" top: "y" scale_param { '
                  'axis: 1 bias_term: true bias_filler { type: "gaussian" } }', [(2, 3, 4), (3,)]).double()
    x, g = randn(2, 3, 4).requires_grad_(True), randn(3, seed=1).requires_grad_(True)
    torch.testing.assert_close(layer(x, g), x * g.reshape(1, 3, 1) + layer.bias.reshape(1, 3, 1))
    torch.autograd.gradcheck(layer, (x, g))
    scalar = build('name: "s" type: "Scale" bottom: "x" bottom: "g" top: "y" scale_param { axis: 2 }',
                   [(2, 3, 4), ()]).double()
    torch.testing.assert_close(scalar(x, torch.tensor(2., dtype=torch.float64)), 2 * x)


def test_bias_layer():
    layer = build('name: "b" type: "Bias" bottom: "x" top: "y" bias_param { axis: 2 num_axes: -1 '
                  'filler { type: "gaussian" } }', [(2, 3, 4, 5)]).double()
    assert tuple(layer.bias.shape) == (4, 5)
    x = randn(2, 3, 4, 5)
    torch.testing.assert_close(layer(x), x + layer.bias.detach())
    torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)
    default = build('name: "b" type: "Bias" bottom: "x" top: "y"', [(2, 3)])
    assert default.bias.tolist() == [0., 0., 0.]
    from_bottom = build('name: "b" type: "Bias" bottom: "x" bottom: "c" top: "y"', [(2, 3, 4), (3, 4)])
    assert from_bottom.caffe_blobs() == []
    torch.testing.assert_close(from_bottom(torch.zeros(2, 3, 4), torch.ones(3, 4)), torch.ones(2, 3, 4))


def test_prelu():
    layer = build('name: "p" type: "PReLU" bottom: "x" top: "y"', [(2, 3, 4)]).double()
    assert layer.slope.tolist() == [0.25] * 3
    with torch.no_grad():
        layer.slope.copy_(torch.tensor([0.1, -0.5, 2.0]))
    x = randn(2, 3, 4)
    torch.testing.assert_close(layer(x), torch.where(x > 0, x, x * layer.slope.detach().reshape(1, 3, 1)))
    torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)
    shared = build('name: "p" type: "PReLU" bottom: "x" top: "y" prelu_param { channel_shared: true '
                   'filler { value: 0.5 } }', [(2, 3)])
    assert shared.slope.shape == () and shared.slope.item() == 0.5


# ------------------------------------------------------------------------------------------------
# DummyData

def test_dummy_data_legacy_shapes_and_one_filler_for_all():
    layer = build('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { num: 2 '
                  'channels: 3 channels: 1 height: 4 width: 5 width: 6 data_filler { value: 7 } }', [])
    a, b = layer()
    assert a.shape == (2, 3, 4, 5) and b.shape == (2, 1, 4, 6)
    assert (a == 7).all() and (b == 7).all()
    a.add_(1)
    assert (layer()[0] == 7).all()      # every forward returns fresh tensors
    assert layer.output_shapes([]) == [(2, 3, 4, 5), (2, 1, 4, 6)]


def test_dummy_data_random_refills_and_xy():
    layer = build('name: "d" type: "DummyData" top: "r" top: "xy" dummy_data_param { '
                  'shape { dim: 3 dim: 4 } shape { dim: 2 dim: 2 dim: 3 dim: 4 } '
                  'data_filler { type: "gaussian" } data_filler { type: "xy" } }', [])
    first, xy = layer()
    second, _ = layer()
    assert first.shape == (3, 4) and not torch.equal(first, second)
    columns = torch.arange(4.).expand(3, 4)
    rows = torch.arange(3.)[:, None].expand(3, 4)
    for image in range(2):           # every image gets (x, y) (SEMANTICS decision 3)
        assert torch.equal(xy[image, 0], columns) and torch.equal(xy[image, 1], rows)
    default = build('name: "d" type: "DummyData" top: "z" dummy_data_param { shape { dim: 2 } }', [])
    assert default().tolist() == [0., 0.]


# ------------------------------------------------------------------------------------------------
# float64 gradcheck where backward is the true derivative

@pytest.mark.parametrize("layer_text, shape", [
    (AWKWARD_CONV, (1, 6, 7, 5)),
    ('name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 2 '
     'kernel_size: 3 bottom_is_im2col: true weight_filler { type: "gaussian" } }', (1, 18, 3, 2)),
    ('name: "d" type: "Deconvolution" bottom: "x" top: "y" convolution_param { num_output: 4 group: 2 '
     'kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "gaussian" } }', (1, 2, 3, 4)),
    ('name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 3 '
     'weight_filler { type: "gaussian" } }', (2, 3, 2)),
    ('name: "i" type: "Im2col" bottom: "x" top: "y" convolution_param { kernel_size: 3 pad: 2 '
     'dilation: 2 stride: 2 }', (1, 2, 5, 6)),
    ('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE kernel_size: 3 '
     'stride: 2 pad: 1 }', (1, 2, 6, 7)),
    ('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX kernel_h: 3 '
     'kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1 }', (1, 2, 6, 5)),
    ('name: "i" type: "Interp" bottom: "x" top: "y" interp_param { height: 7 width: 3 }', (1, 2, 4, 5)),
], ids=["conv_awkward", "conv_im2col", "deconv", "innerproduct", "im2col", "pool_ave", "pool_max",
        "interp"])
def test_gradcheck(layer_text, shape):
    layer = build(layer_text, [shape]).double()
    with torch.no_grad():
        for blob in layer.caffe_blobs():
            blob.copy_(randn(*blob.shape, seed=5))
    x = randn(*shape).requires_grad_(True)
    params = tuple(layer.caffe_blobs())
    torch.autograd.gradcheck(lambda inp, *ps: layer(inp), (x, *params), fast_mode=True)


# ------------------------------------------------------------------------------------------------
# Errors name the layer and say what was expected

@pytest.mark.parametrize("layer_text, shapes, message", [
    ('name: "c1" type: "Convolution" bottom: "x" top: "y" convolution_param { kernel_size: 3 }',
     [(1, 2, 5, 5)], r"c1 \(Convolution\): convolution_param.num_output is required"),
    ('name: "c2" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
     'kernel_size: 3 group: 3 }', [(1, 4, 5, 5)], r"c2 \(Convolution\): .*group 3 does not divide the 4"),
    ('name: "c3" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 }',
     [(1, 4, 5, 5)], r"c3 \(Convolution\): convolution_param.kernel_size is required"),
    ('name: "c4" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
     'kernel_size: 3 bottom_is_im2col: true }', [(1, 10, 5, 5)], r"c4 \(Convolution\): .*not a multiple"),
    ('name: "c5" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
     'kernel_size: 7 }', [(1, 4, 5, 5)], r"c5 \(Convolution\): .*empty output"),
    ('name: "c6" type: "Convolution" bottom: "a" bottom: "b" top: "y" convolution_param { '
     'num_output: 4 kernel_size: 1 }', [(1, 4, 5, 5), (1, 4, 5, 5)], r"c6 \(Convolution\): needs one top per bottom"),
    ('name: "ip" type: "InnerProduct" bottom: "x" top: "y"', [(1, 4)],
     r"ip \(InnerProduct\): inner_product_param.num_output is required"),
    ('name: "p1" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX }', [(1, 1, 4, 4)],
     r"p1 \(Pooling\): pooling_param.kernel_size"),
    ('name: "p2" type: "Pooling" bottom: "x" top: "y" pooling_param { kernel_size: 2 pad: 2 }',
     [(1, 1, 4, 4)], r"p2 \(Pooling\): .*pad \(2, 2\) must be smaller than the kernel"),
    ('name: "p3" type: "Pooling" bottom: "x" top: "y" pooling_param { global_pooling: true '
     'kernel_size: 2 }', [(1, 1, 4, 4)], r"p3 \(Pooling\): with global_pooling"),
    ('name: "p4" type: "Pooling" bottom: "x" top: "y" top: "m" pooling_param { pool: AVE '
     'kernel_size: 2 }', [(1, 1, 4, 4)], r"p4 \(Pooling\): AVE pooling has one top"),
    ('name: "i1" type: "Interp" bottom: "x" top: "y" interp_param { height: 4 }', [(1, 1, 4, 4)],
     r"i1 \(Interp\): interp_param needs an output size rule"),
    ('name: "i2" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 2 pad_beg: 1 }',
     [(1, 1, 4, 4)], r"i2 \(Interp\): interp_param.pad_beg and pad_end must be <= 0"),
    ('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 4 }', [(1, 1, 4, 4)],
     r"l \(LRN\): lrn_param.local_size must be odd, got 4"),
    ('name: "s1" type: "Scale" bottom: "x" bottom: "g" top: "y"', [(2, 3, 4), (4,)],
     r"s1 \(Scale\): the scale bottom's shape \(4,\) must match"),
    ('name: "s2" type: "Scale" bottom: "x" top: "y" scale_param { axis: 2 num_axes: 2 }',
     [(2, 3, 4)], r"s2 \(Scale\): scale_param: axis 2 \+ num_axes 2 runs past"),
    ('name: "s3" type: "Scale" bottom: "x" top: "y" scale_param { axis: 3 }', [(2, 3, 4)],
     r"s3 \(Scale\): scale_param.axis 3 is out of range"),
    ('name: "d1" type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 1 } '
     'data_filler {} data_filler {} data_filler {} }', [], r"d1 \(DummyData\): .*data_filler"),
    ('name: "d2" type: "DummyData" top: "a" dummy_data_param { shape { dim: 1 dim: 3 } '
     'data_filler { type: "xy" } }', [], r"d2 \(DummyData\): the xy filler needs"),
    ('name: "d3" type: "DummyData" top: "a" dummy_data_param { num: 1 num: 2 channels: 1 '
     'height: 1 width: 1 }', [], r"d3 \(DummyData\): dummy_data_param.num needs 1 or 1"),
])
def test_errors(layer_text, shapes, message):
    with pytest.raises(LayerSetupError, match=message):
        build(layer_text, shapes)


def test_unsupported_features_fail_at_build():
    with pytest.raises(LayerSetupError, match=r"p \(Pooling\): .*padding is implemented only "
                                              r"for MAX and AVE"):
        build('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: STOCHASTIC '
              'kernel_size: 2 pad: 1 }', [(1, 1, 4, 4)])
    with pytest.raises(NotImplementedError, match=r"d \(Deconvolution\): .*bottom_is_im2col"):
        build('name: "d" type: "Deconvolution" bottom: "x" top: "y" convolution_param { '
              'num_output: 2 kernel_size: 2 bottom_is_im2col: true }', [(1, 4, 4, 4)])
    with pytest.raises(NotImplementedError, match=r"c \(Convolution\): only 2-D"):
        build('name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { '
              'num_output: 2 kernel_size: 2 }', [(1, 4, 4, 4, 4)])
