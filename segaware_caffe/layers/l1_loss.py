"""L1Loss (FlowNet): L1 or per-location L2 norm of a difference, NaN-masked. The original has
only GPU code for this layer; this follows it."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape


class _L1LossFunction(torch.autograd.Function):
    """The original's forward and backward on d (b0 - b1, or b0 alone); see L1Loss."""

    @staticmethod
    def forward(ctx, d, per_location, prescale, by_entries, epsilon, plateau):
        channels = d.shape[1] if d.dim() > 1 else 1
        valid = ~torch.isnan(d)
        if by_entries:
            normalizer = valid.sum().to(d.dtype) / channels
        else:
            normalizer = torch.tensor(float(d.shape[0]), dtype=d.dtype, device=d.device)
        if per_location:
            d0 = torch.where(valid, d, torch.zeros_like(d))
            weight = float(np.float32(1) / np.float32(channels)) if prescale else 1.0
            sums = (d0 * d0).sum(1, keepdim=True) * weight
            keep = torch.ones_like(sums, dtype=torch.bool)
            if plateau > 0:
                keep = ~(torch.abs(sums) < float(np.float32(plateau) * np.float32(plateau)))
                sums = torch.where(keep, sums, torch.zeros_like(sums))
            roots = torch.sqrt(sums + epsilon)
            loss = roots.sum() / normalizer
            ctx.save_for_backward(d0, valid, keep, roots, sums, normalizer)
            ctx.weight = weight
        else:
            mask = valid
            if plateau > 0:
                mask = mask & ~(torch.abs(d) < plateau)
            d0 = torch.where(mask, d, torch.zeros_like(d))
            sign = torch.where(d0 > 0, 1.0, -1.0).to(d.dtype)
            loss = (d0 * sign).sum() / normalizer
            ctx.save_for_backward(sign, mask, normalizer)
        ctx.per_location, ctx.epsilon = per_location, epsilon
        return loss

    @staticmethod
    def backward(ctx, grad):
        if ctx.per_location:
            d0, valid, keep, roots, sums, normalizer = ctx.saved_tensors
            alpha = grad / normalizer
            # sqrt (Power 0.5 with shift epsilon), plateau mask, channel sum, square, NaN mask
            grad_sums = alpha * 0.5 * roots / (sums + ctx.epsilon) * keep.to(d0.dtype)
            grad_d = grad_sums * ctx.weight * 2 * d0 * valid.to(d0.dtype)
        else:
            sign, mask, normalizer = ctx.saved_tensors
            # sign(0) is -1 here: an unmasked difference of exactly 0 gets -alpha
            grad_d = (grad / normalizer) * sign * mask.to(sign.dtype)
        return grad_d, None, None, None, None, None


@register_layer("L1Loss")
class L1Loss(CaffeLayer):
    """d = bottom0 - bottom1 (or bottom0 alone with one bottom); entries of d that are NaN count
    as 0 and get no gradient. loss = sum|d| / normalizer, or with l2_per_location
    sum over locations of sqrt(w * sum_c d^2 + epsilon) / normalizer (w = 1/C with
    l2_prescale_by_channels, else 1). normalizer: N (the first dimension), or with
    normalize_by_num_entries the number of non-NaN entries / C. plateau > 0 zeroes |d| < plateau
    (L1) or the channel sums below plateau^2 (L2; such a location still adds sqrt(epsilon)).
    Gradient: the L1 sign with sign(0) = -1 (an unmasked exact zero gets -1/normalizer), the L2
    norm's derivative; opposite signs to the two bottoms. The original has only GPU code,
    followed here, which also writes the NaN-zeroed d back into a single bottom's data."""
    BOTTOMS = (1, 2)
    IS_LOSS = True
    NO_FORCE_BACKWARD = ()       # unlike other losses, force_backward reaches both bottoms

    def __init__(self, *, l2_per_location=False, l2_prescale_by_channels=False,
                 normalize_by_num_entries=False, epsilon=0.01, plateau=0.0):
        super().__init__()
        self.l2_per_location = l2_per_location
        self.l2_prescale_by_channels = l2_prescale_by_channels
        self.normalize_by_num_entries = normalize_by_num_entries
        self.epsilon, self.plateau = epsilon, plateau

    @classmethod
    def from_proto(cls, layer_param, ctx):
        shapes = [tuple(s) for s in ctx.bottom_shapes]
        legacy_shape(shapes[0], ctx, "bottom 0")
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            raise ctx.error(f"both bottoms must have the same shape, got {shapes[0]} and {shapes[1]}")
        p = layer_param.l1_loss_param
        if p.l2_per_location and len(shapes[0]) < 2:
            raise ctx.error(f"l1_loss_param.l2_per_location sums over channels (axis 1); the "
                            f"bottom {shapes[0]} has none")
        return cls(l2_per_location=bool(p.l2_per_location),
                   l2_prescale_by_channels=bool(p.l2_prescale_by_channels),
                   normalize_by_num_entries=bool(p.normalize_by_num_entries),
                   epsilon=float(np.float32(p.epsilon)), plateau=float(np.float32(p.plateau)))

    def forward(self, a, b=None):
        d = a if b is None else a - b
        return _L1LossFunction.apply(d, self.l2_per_location, self.l2_prescale_by_channels,
                                     self.normalize_by_num_entries, self.epsilon, self.plateau)

    def output_shapes(self, bottom_shapes):
        return [()]

    def extra_repr(self):
        flags = [n for n in ("l2_per_location", "l2_prescale_by_channels", "normalize_by_num_entries")
                 if getattr(self, n)]
        return ", ".join(flags + [f"epsilon={self.epsilon:g}"] +
                         ([f"plateau={self.plateau:g}"] if self.plateau > 0 else []))
