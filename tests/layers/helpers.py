"""What the layer tests share: one layer built from its prototxt text, as the net builder would
set it up, and seeded random inputs."""
import itertools

import torch

from segaware_caffe import BuildContext
from segaware_caffe.caffe_proto import read_net
from segaware_caffe.layer import layer_class


def build(layer_param, bottom_shapes, phase="TEST", top_names=None):
    """A layer from `layer { ... }` body text (or a LayerParameter), set up for bottom_shapes."""
    if isinstance(layer_param, str):
        layer_param = read_net(f"layer {{ {layer_param} }}").layer[0]
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase=phase,
                       bottom_shapes=[tuple(s) for s in bottom_shapes],
                       bottom_names=list(layer_param.bottom),
                       top_names=list(top_names if top_names is not None else layer_param.top))
    return layer_class(layer_param.type, layer_param.name).from_proto(layer_param, ctx)


def as_tuple(tops):
    return (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)


def randn(*shape, seed=0, dtype=torch.float64, requires_grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.requires_grad_(requires_grad)


def softmax_loss(loss_param="", shape=(2, 3, 1, 2), tops=1, extra=""):
    top_text = 'top: "loss"' + (' top: "prob" loss_weight: 1 loss_weight: 0' if tops == 2 else "")
    return build(f'name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" {top_text} '
                 f'loss_param {{ {loss_param} }} {extra}', [shape, (shape[0], 1, *shape[2:])])


def seg_accuracy(params, scores_shape, labels_shape=None):
    n, _, h, w = scores_shape
    return build(f'name: "acc" type: "SegAccuracy" bottom: "s" bottom: "l" top: "acc" '
                 f'seg_accuracy_param {{ {params} }}', [scores_shape, labels_shape or (n, 1, h, w)])


def patch_positions(height, width, kernel, pad, stride, dilation):
    """Every tap of a square patch layer's output: (tap k, ho, wo, is the centre tap, centre
    pixel, tap pixel, centre inside, tap inside, output size)."""
    out_h = (height + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    out_w = (width + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    centre = (kernel // 2) * dilation
    for i, j, oh, ow in itertools.product(range(kernel), range(kernel), range(out_h), range(out_w)):
        ch, cw = oh * stride - pad + centre, ow * stride - pad + centre
        nh, nw = oh * stride - pad + i * dilation, ow * stride - pad + j * dilation
        yield (i * kernel + j, oh, ow, (i, j) == (kernel // 2,) * 2, (ch, cw), (nh, nw),
               0 <= ch < height and 0 <= cw < width, 0 <= nh < height and 0 <= nw < width,
               (out_h, out_w))


def check_top_and_gradient(layer, x, ref_top, ref_grad):
    """The layer's top and the bottom gradient of a top gradient of ones, against references."""
    from tests.tolerances import assert_close
    xt = torch.tensor(x, requires_grad=True)
    top = layer(xt)
    top.backward(torch.ones_like(top))
    assert_close(top, ref_top, "top")
    assert_close(xt.grad, ref_grad, "bottom diff")
