"""segaware_caffe.flops: GEMM FLOPs of a built net, checked against multiply-adds counted by running
each layer's product on ones (float64), at odd shapes, groups, strides, dilations and batch > 1."""
import math

import pytest
import torch
import torch.nn.functional as F

import segaware_caffe as sc
from segaware_caffe.flops import LayerFlops, layer_flops, net_flops
from tests.conftest import GOLDEN

NET = """
name: "flops"
layer { name: "in" type: "Input" top: "data" top: "data2" top: "emb"
  input_param { shape { dim: 2 dim: 6 dim: 11 dim: 13 } shape { dim: 2 dim: 6 dim: 11 dim: 13 }
                shape { dim: 2 dim: 3 dim: 11 dim: 13 } } }
layer { name: "conv" type: "Convolution" bottom: "data" bottom: "data2" top: "a1" top: "a2"
  convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2 stride_h: 2
                      stride_w: 1 dilation: 2 group: 2 } }
layer { name: "relu" type: "ReLU" bottom: "a1" top: "a1" }
layer { name: "deconv" type: "Deconvolution" bottom: "a1" top: "d"
  convolution_param { num_output: 6 kernel_size: 4 stride: 2 group: 2 bias_term: false } }
layer { name: "deconv_pad" type: "Deconvolution" bottom: "a2" top: "dp"
  convolution_param { num_output: 3 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "a1" top: "f" inner_product_param { num_output: 5 } }
layer { name: "ip_t" type: "InnerProduct" bottom: "a2" top: "g"
  inner_product_param { num_output: 7 axis: 2 transpose: true } }
layer { name: "col" type: "Im2col" bottom: "data" top: "col"
  convolution_param { kernel_size: 3 pad: 1 } }
layer { name: "conv_col" type: "Convolution" bottom: "col" top: "c"
  convolution_param { num_output: 3 kernel_size: 3 bottom_is_im2col: true } }
layer { name: "nconv" type: "NormConv" bottom: "data" bottom: "emb" top: "n"
  convolution_param { num_output: 5 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "pool" type: "Pooling" bottom: "c" top: "p" pooling_param { pool: MAX kernel_size: 2 } }
"""


def conv_macs(x_shape, weight_shape, pad, stride, dilation, group):
    """Multiply-adds of a convolution, padded taps included: the sum of the conv of an input padded
    with ONES (so no tap is skipped) with an all-ones weight."""
    x = F.pad(torch.ones(x_shape, dtype=torch.float64), (pad[1], pad[1], pad[0], pad[0]), value=1.0)
    w = torch.ones(weight_shape, dtype=torch.float64)
    return int(F.conv2d(x, w, stride=stride, dilation=dilation, groups=group).sum().item())


def deconv_macs(x_shape, weight_shape, stride, group):
    """Multiply-adds of an unpadded deconvolution: every product lands in the output, so the sum of
    the transposed conv of ones with ones counts them."""
    x = torch.ones(x_shape, dtype=torch.float64)
    w = torch.ones(weight_shape, dtype=torch.float64)
    return int(F.conv_transpose2d(x, w, stride=stride, groups=group).sum().item())


@pytest.fixture(scope="module")
def net():
    return sc.Net(NET, phase="test")


def test_layer_flops_of_each_gemm_layer(net):
    got = {item.name: item for item in layer_flops(net)}
    assert [item.name for item in layer_flops(net)] == \
        ["conv", "deconv", "deconv_pad", "ip", "ip_t", "conv_col", "nconv"]   # Caffe order
    assert all(isinstance(item, LayerFlops) for item in got.values())
    assert got["conv"].type == "Convolution" and got["nconv"].type == "NormConv"
    # two bottoms through the same weights: twice the work of one
    one = conv_macs((2, 6, 11, 13), (4, 3, 3, 2), pad=(1, 2), stride=(2, 1), dilation=2, group=2)
    assert got["conv"].flops == 2 * 2 * one
    a_shape = net.blob_shapes["a1"]
    assert got["deconv"].flops == 2 * deconv_macs(a_shape, (4, 3, 4, 4), stride=2, group=2)
    # padding crops the deconvolution's output but not the GEMM before col2im
    assert got["deconv_pad"].flops == 2 * deconv_macs(a_shape, (4, 3, 3, 3), stride=2, group=1)
    assert got["ip"].flops == 2 * 2 * 5 * math.prod(a_shape[1:])
    # axis 2: rows = N * C, K = H * W
    assert got["ip_t"].flops == 2 * (a_shape[0] * a_shape[1]) * 7 * (a_shape[2] * a_shape[3])
    # the column conv: each output element takes C * K = 6 * 9 multiply-adds
    assert got["conv_col"].flops == 2 * (2 * 3 * 11 * 13) * (6 * 9)
    assert got["nconv"].flops == 2 * conv_macs((2, 6, 11, 13), (5, 6, 3, 3), pad=(1, 1),
                                               stride=(2, 2), dilation=1, group=1)


def test_net_flops_sums_and_backward_triples(net):
    total = sum(item.flops for item in layer_flops(net))
    assert net_flops(net) == total > 0
    assert net_flops(net, backward=True) == 3 * total


def test_net_without_gemm_layers_has_no_flops():
    net = sc.Net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }'
                 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }')
    assert layer_flops(net) == [] and net_flops(net) == 0


def test_fused_segaware_conv_counts_as_its_convolution():
    case = GOLDEN / "layers" / "segaware_conv" / "net.prototxt"
    fused, plain = sc.Net(case), sc.Net(case, fuse=False)
    assert fused.fused_groups and not plain.fused_groups
    assert layer_flops(fused) == layer_flops(plain)
    # x (2, 3, 11, 12), 3x3 pad 1, 5 outputs: 2 * N * O * H * W * C * 9
    assert net_flops(fused) == 2 * 2 * 5 * 11 * 12 * 3 * 9


def test_vgg_deploy_flops(reference):
    """config/vgg/deploy.prototxt at its declared 321x321: about 147 GFLOP."""
    net = sc.Net(reference / "segaware/config/vgg/deploy.prototxt")
    assert net_flops(net) == pytest.approx(146.57e9, rel=1e-3)
