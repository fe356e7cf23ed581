"""Accuracy: top-k classification accuracy (optionally per class). Forward only."""
import math

import torch

from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis
from .softmax_loss import check_labels


@register_layer("Accuracy")
class Accuracy(CaffeLayer):
    """A position counts as correct when its label is among the top_k scores along `axis`, scores
    ranked by (value, class index) descending (so among equal scores the higher class ranks
    first, like the original's partial_sort). Top 0 = correct / counted (0-axis; positions with
    ignore_label are not counted, and 0/0 = NaN when all are, as the original divides
    unguarded); optional top 1 = accuracy per class (0 for absent classes)."""
    BOTTOMS = (2, 2)
    TOPS = (1, 2)
    HAS_BACKWARD = False

    def __init__(self, *, top_k=1, axis=1, ignore_label=None, per_class=False, where="Accuracy"):
        super().__init__()
        self.top_k, self.axis, self.ignore_label = top_k, axis, ignore_label
        self.per_class = per_class
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.accuracy_param
        scores_shape, label_shape = (tuple(s) for s in ctx.bottom_shapes)
        axis = canonical_axis(p.axis, len(scores_shape), ctx, "accuracy_param.axis")
        outer, inner = math.prod(scores_shape[:axis]), math.prod(scores_shape[axis + 1:])
        if not 1 <= p.top_k <= scores_shape[axis]:
            raise ctx.error(f"accuracy_param.top_k must be in 1..{scores_shape[axis]} (the number "
                            f"of classes), got {p.top_k}")
        if math.prod(label_shape) != outer * inner:
            raise ctx.error(f"labels {label_shape} must have one entry per prediction: "
                            f"{outer * inner} for scores {scores_shape} with axis {axis}")
        return cls(top_k=int(p.top_k), axis=axis,
                   ignore_label=int(p.ignore_label) if p.HasField("ignore_label") else None,
                   per_class=len(ctx.top_names) == 2, where=f"{ctx.name} ({ctx.type})")

    @torch.no_grad()        # the original has no backward: keep no graph
    def forward(self, scores, labels):
        shape = scores.shape
        outer, channels = math.prod(shape[:self.axis]), shape[self.axis]
        scores3 = scores.reshape(outer, channels, -1)
        label = labels.reshape(outer, -1).to(torch.int64)
        check_labels(labels, channels, self.ignore_label, self.where)
        counted = torch.ones_like(label, dtype=torch.bool)
        if self.ignore_label is not None:
            counted = label != self.ignore_label
        safe_label = torch.where(counted, label, torch.zeros_like(label))
        label_score = scores3.gather(1, safe_label.unsqueeze(1))
        classes = torch.arange(channels, device=scores.device).view(1, channels, 1)
        ranked_above = (scores3 > label_score) | ((scores3 == label_score) & (classes > safe_label.unsqueeze(1)))
        correct = (ranked_above.sum(1) < self.top_k) & counted
        accuracy = correct.sum().to(scores.dtype) / counted.sum().to(scores.dtype)
        if not self.per_class:
            return accuracy
        per_class_total = torch.bincount(safe_label[counted], minlength=channels)
        per_class_correct = torch.bincount(safe_label[correct], minlength=channels)
        per_class = torch.where(per_class_total > 0,
                                per_class_correct.to(scores.dtype) / per_class_total.clamp(min=1),
                                torch.zeros((), dtype=scores.dtype, device=scores.device))
        return accuracy, per_class

    def output_shapes(self, bottom_shapes):
        return [()] + ([(bottom_shapes[0][self.axis],)] if self.per_class else [])

    def extra_repr(self):
        parts = [f"top_k={self.top_k}", f"axis={self.axis}"]
        if self.ignore_label is not None:
            parts.append(f"ignore_label={self.ignore_label}")
        return ", ".join(parts)
