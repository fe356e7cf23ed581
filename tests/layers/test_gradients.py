"""float64 gradcheck of the layers whose backward is the true derivative, at awkward
geometries."""

import pytest
import torch


from tests.layers.helpers import build, randn
from tests.layers.test_convolution import AWKWARD_CONV


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
