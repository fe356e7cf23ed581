"""Convolution (with the fork's bottom_is_im2col), Deconvolution and Im2col against
references written from the definitions."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F


from tests.layers.helpers import build, randn


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


@pytest.mark.parametrize("bias_term", ["true", "false"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pointwise_convolution_as_batched_products(bias_term, dtype):
    """A 1x1 convolution of standard-layout CPU images runs as batched products: the top and
    every gradient are torch's convolution's within rounding, for several images; channels_last
    images keep torch's convolution."""
    from segaware_caffe.layers import convolution as convolution_module
    layer = build('name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { '
                  f'num_output: 5 kernel_size: 1 bias_term: {bias_term} '
                  'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
                  [(3, 7, 4, 6)]).to(dtype)
    x = randn(3, 7, 4, 6, dtype=dtype, requires_grad=True)
    assert convolution_module._batched_product_is_faster(x, layer.weight)
    assert not convolution_module._batched_product_is_faster(
        x.detach().to(memory_format=torch.channels_last), layer.weight)
    grad = randn(3, 5, 4, 6, seed=1, dtype=dtype)
    top = layer(x)
    params = [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    got = torch.autograd.grad(top, params, grad)
    expected_top = F.conv2d(x, layer.weight, layer.bias)
    expected = torch.autograd.grad(expected_top, params, grad)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(top, expected_top, rtol=tolerance, atol=tolerance)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


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
