"""SoftmaxWithLoss: softmax followed by the multinomial log loss, with ignore_label and the
original's normalisation modes."""
import math

import numpy as np
import torch

from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis

FLT_MIN = float(np.finfo(np.float32).tiny)
_NORMALIZATIONS = {0: "FULL", 1: "VALID", 2: "BATCH_SIZE", 3: "NONE"}  # LossParameter enum


def loss_normalization(loss_param):
    """The effective normalisation mode: the legacy `normalize` flag counts only when
    `normalization` is not set (true -> VALID, false -> BATCH_SIZE)."""
    if not loss_param.HasField("normalization") and loss_param.HasField("normalize"):
        return "VALID" if loss_param.normalize else "BATCH_SIZE"
    return _NORMALIZATIONS[loss_param.normalization]


def _normalizer(mode, outer, inner, valid_count):
    """max(1, n) with n per mode (as a float32 tensor so VALID stays on the device)."""
    if mode == "VALID":
        return torch.clamp(valid_count.to(torch.float32), min=1.0)
    n = {"FULL": outer * inner, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return torch.tensor(float(max(1, n)), dtype=torch.float32, device=valid_count.device)


def check_labels(labels, num_classes, ignore_label, where):
    """Raise when a non-ignored label (after int() truncation) is outside [0, num_classes)."""
    label = labels.detach().to(torch.int64)
    bad = (label < 0) | (label >= num_classes)
    if ignore_label is not None:
        bad &= label != ignore_label
    if bool(bad.any()):
        value = labels.detach()[bad].flatten()[0].item()
        raise ValueError(f"{where}: label {value:g} is outside [0, {num_classes}) "
                         f"and is not the ignore_label ({ignore_label})")


class _SoftmaxLossFunction(torch.autograd.Function):
    """Forward: (loss, prob). Backward: d scores = (prob - onehot) * d loss / normalizer, zero at
    ignored positions; the label and the prob top get no gradient (as in the original)."""

    @staticmethod
    def forward(ctx, scores, labels, axis, ignore_label, mode):
        shape = scores.shape
        outer, channels = math.prod(shape[:axis]), shape[axis]
        inner = math.prod(shape[axis + 1:])
        prob = torch.softmax(scores, dim=axis)
        prob3 = prob.reshape(outer, channels, inner)
        label = labels.reshape(outer, inner).to(torch.int64)     # C++ int(): truncation
        valid = torch.ones_like(label, dtype=torch.bool)
        if ignore_label is not None:
            valid = label != ignore_label
        safe_label = torch.where(valid, label, torch.zeros_like(label)).clamp(0, channels - 1)
        picked = prob3.gather(1, safe_label.unsqueeze(1)).squeeze(1)
        log_prob = torch.log(torch.clamp(picked, min=FLT_MIN))
        normalizer = _normalizer(mode, outer, inner, valid.sum())
        loss = -torch.where(valid, log_prob, torch.zeros_like(log_prob)).sum() / normalizer
        ctx.save_for_backward(prob, safe_label, valid, normalizer)
        ctx.axis = axis
        ctx.mark_non_differentiable(prob)
        return loss, prob

    @staticmethod
    def backward(ctx, grad_loss, grad_prob):
        prob, safe_label, valid, normalizer = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[0]:
            shape = prob.shape
            outer, channels = safe_label.shape[0], shape[ctx.axis]
            grad3 = prob.reshape(outer, channels, -1).clone()
            grad3.scatter_add_(1, safe_label.unsqueeze(1),
                               torch.full_like(safe_label, -1, dtype=prob.dtype).unsqueeze(1))
            grad3 = grad3 * valid.unsqueeze(1).to(prob.dtype)
            grad_scores = (grad3 * (grad_loss / normalizer)).reshape(shape)
        return grad_scores, None, None, None, None


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLoss(CaffeLayer):
    """loss = -sum_{non-ignored} log(max(prob[label], FLT_MIN)) / normalizer over the softmax of
    bottom 0 along softmax_param.axis; labels (bottom 1, one per position) are int()-truncated.
    Top 0 is the 0-axis loss, optional top 1 the probabilities (no gradient flows back from it)."""
    BOTTOMS = (2, 2)
    TOPS = (1, 2)
    IS_LOSS = True
    NO_GRAD_BOTTOMS = (1,)

    def __init__(self, *, axis=1, ignore_label=None, normalization="VALID", with_prob=False,
                 where="SoftmaxWithLoss"):
        super().__init__()
        self.axis, self.ignore_label, self.normalization = axis, ignore_label, normalization
        self.with_prob = with_prob
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        scores_shape, label_shape = (tuple(s) for s in ctx.bottom_shapes)
        axis = canonical_axis(layer_param.softmax_param.axis, len(scores_shape), ctx,
                              "softmax_param.axis")
        outer, inner = math.prod(scores_shape[:axis]), math.prod(scores_shape[axis + 1:])
        if not label_shape or not scores_shape or label_shape[0] != scores_shape[0]:
            raise ctx.error(f"scores {scores_shape} and labels {label_shape} must have the same "
                            f"first dim (number of items)")
        if math.prod(label_shape) != outer * inner:
            raise ctx.error(f"labels {label_shape} must have one entry per prediction: "
                            f"{outer * inner} for scores {scores_shape} with softmax axis {axis}")
        if len(ctx.top_names) == 2 and len(layer_param.loss_weight) != 2:
            raise ctx.error("with a second top (the probabilities) give loss_weight once per top, "
                            f"got {len(layer_param.loss_weight)} loss_weight values for 2 tops")
        lp = layer_param.loss_param
        return cls(axis=axis, ignore_label=int(lp.ignore_label) if lp.HasField("ignore_label") else None,
                   normalization=loss_normalization(lp), with_prob=len(ctx.top_names) == 2,
                   where=f"{ctx.name} ({ctx.type})")

    def forward(self, scores, labels):
        check_labels(labels, scores.shape[self.axis], self.ignore_label, self.where)
        loss, prob = _SoftmaxLossFunction.apply(scores, labels, self.axis, self.ignore_label,
                                                self.normalization)
        return (loss, prob) if self.with_prob else loss

    def output_shapes(self, bottom_shapes):
        return [()] + ([tuple(bottom_shapes[0])] if self.with_prob else [])

    def extra_repr(self):
        parts = [f"axis={self.axis}", f"normalization={self.normalization}"]
        if self.ignore_label is not None:
            parts.append(f"ignore_label={self.ignore_label}")
        return ", ".join(parts)
