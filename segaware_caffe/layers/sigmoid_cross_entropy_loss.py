"""SigmoidCrossEntropyLoss: cross-entropy of sigmoid(x) against targets in [0, 1]."""
import math

import torch

from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape


class _SigmoidCrossEntropyFunction(torch.autograd.Function):
    """Forward: sum of max(x, 0) - x t + log(1 + exp(-|x|)) over all elements, / N. Backward:
    (sigmoid(x) - t) / N, also at x = 0 where the pieces of the stable form have kinks."""

    @staticmethod
    def forward(ctx, x, target):
        num = x.shape[0] if x.dim() else 1
        loss = (torch.relu(x) - x * target + torch.log1p(torch.exp(-torch.abs(x)))).sum() / num
        ctx.save_for_backward(x, target)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, target = ctx.saved_tensors
        return (torch.sigmoid(x) - target) * (grad / (x.shape[0] if x.dim() else 1)), None


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(CaffeLayer):
    """Scores x and targets t of the same count (soft targets allowed).
    loss = sum(max(x, 0) - x t + log(1 + exp(-|x|))) / N with N = x.shape[0] (the number of
    items, not of elements); gradient (sigmoid(x) - t) / N; none to the targets."""
    BOTTOMS = (2, 2)
    IS_LOSS = True
    NO_GRAD_BOTTOMS = (1,)

    def __init__(self):
        super().__init__()

    @classmethod
    def from_proto(cls, layer_param, ctx):
        scores, target = (tuple(s) for s in ctx.bottom_shapes)
        num = legacy_shape(scores, ctx, "the scores bottom")[0]
        if legacy_shape(target, ctx, "the target bottom")[0] != num:
            raise ctx.error(f"scores {scores} and targets {target} must have the same first dim "
                            f"(number of items)")
        if math.prod(scores) != math.prod(target):
            raise ctx.error(f"scores {scores} and targets {target} must have the same count")
        return cls()

    def forward(self, x, target):
        return _SigmoidCrossEntropyFunction.apply(x, target.reshape(x.shape))

    def output_shapes(self, bottom_shapes):
        return [()]
