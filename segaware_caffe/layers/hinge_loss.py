"""HingeLoss: one-vs-all hinge loss (L1 or squared L2) for classification scores."""
import math

import torch

from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape
from .softmax_loss import check_labels

_NORMS = {1: "L1", 2: "L2"}   # HingeLossParameter.Norm


@register_layer("HingeLoss")
class HingeLoss(CaffeLayer):
    """Scores x (N, K...) with the K... values of an item flattened, labels (N). With
    s = -x at the true class and x elsewhere, m = max(0, 1 + s); loss = sum(m) / N (L1) or
    sum(m^2) / N (L2). Gradient: sign(m) (L1) or 2m (L2), negated at the true class, / N; none
    to the labels.

    The original computes m into the scores' diff during forward and turns it into the gradient
    during backward; in a training step (nothing clears blob diffs in between) that is exactly
    this derivative, with 0 where m = 0."""
    BOTTOMS = (2, 2)
    IS_LOSS = True
    NO_GRAD_BOTTOMS = (1,)

    def __init__(self, *, norm="L1", where="HingeLoss"):
        super().__init__()
        if norm not in ("L1", "L2"):
            raise ValueError(f"norm must be 'L1' or 'L2', got {norm!r}")
        self.norm = norm
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        scores, labels = (tuple(s) for s in ctx.bottom_shapes)
        num = legacy_shape(scores, ctx, "the scores bottom")[0]
        if legacy_shape(labels, ctx, "the label bottom")[0] != num or math.prod(labels) != num:
            raise ctx.error(f"the label bottom must hold one label per item ({num} for scores "
                            f"{scores}), got shape {labels}")
        norm = layer_param.hinge_loss_param.norm
        if norm not in _NORMS:
            raise ctx.error(f"hinge_loss_param.norm must be L1 or L2, got {norm}")
        return cls(norm=_NORMS[norm], where=f"{ctx.name} ({ctx.type})")

    def forward(self, scores, labels):
        num = scores.shape[0]
        x = scores.reshape(num, -1)
        check_labels(labels, x.shape[1], None, self.where)
        label = labels.detach().reshape(num).to(torch.int64)
        flip = torch.ones_like(x).scatter_(1, label.unsqueeze(1), -1.0)
        # relu: zero gradient where 1 + s == 0 exactly, as sign(0) = 0 in the original
        margin = torch.relu(1 + flip * x)
        return (margin.sum() if self.norm == "L1" else (margin * margin).sum()) / num

    def output_shapes(self, bottom_shapes):
        return [()]

    def extra_repr(self):
        return f"norm={self.norm}"
