"""MultinomialLogisticLoss: -log of the probability given to the true class."""
import math

import numpy as np
import torch

from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape
from .softmax_loss import check_labels

# kLOG_THRESHOLD of the original: probabilities are clamped to it before the log
LOG_THRESHOLD = float(np.float32(1e-20))


class _ClampedLog(torch.autograd.Function):
    """log(max(p, 1e-20)) with the original's gradient 1 / max(p, 1e-20) everywhere, also below
    the clamp (there the true derivative would be 0): about 1e20 for p = 0."""

    @staticmethod
    def forward(ctx, p):
        clamped = torch.clamp(p, min=LOG_THRESHOLD)
        ctx.save_for_backward(clamped)
        return torch.log(clamped)

    @staticmethod
    def backward(ctx, grad):
        (clamped,) = ctx.saved_tensors
        return grad / clamped


def clamped_log(p):
    return _ClampedLog.apply(p)


def check_item_labels(ctx, prob_shape, label_shape):
    """Caffe's checks of these loss layers: label (N, 1, 1, 1) in legacy terms, N = the
    probabilities' num. Returns (N, values per item)."""
    num = legacy_shape(prob_shape, ctx, "the probability bottom")[0]
    label = legacy_shape(label_shape, ctx, "the label bottom")
    if label[1:] != (1, 1, 1) or label[0] != num:
        raise ctx.error(f"the label bottom must have shape ({num},) or ({num}, 1, 1, 1), one label "
                        f"per item of {tuple(prob_shape)}, got {tuple(label_shape)}")
    return num, math.prod(prob_shape) // num if num else 0


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLoss(CaffeLayer):
    """Probabilities p (N, K...; the K... values of an item flattened) and labels (N).
    loss = -sum_n log(max(p[n, label_n], 1e-20)) / N. Gradient -1 / (N max(p, 1e-20)) at each
    true class (also below the clamp), 0 elsewhere; none to the labels."""
    BOTTOMS = (2, 2)
    IS_LOSS = True
    NO_GRAD_BOTTOMS = (1,)

    def __init__(self, *, where="MultinomialLogisticLoss"):
        super().__init__()
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        check_item_labels(ctx, *ctx.bottom_shapes)
        return cls(where=f"{ctx.name} ({ctx.type})")

    def forward(self, prob, labels):
        num = prob.shape[0]
        p = prob.reshape(num, -1)
        check_labels(labels, p.shape[1], None, self.where)
        label = labels.detach().reshape(num, 1).to(torch.int64)
        return -clamped_log(p.gather(1, label)).sum() / num

    def output_shapes(self, bottom_shapes):
        return [()]
