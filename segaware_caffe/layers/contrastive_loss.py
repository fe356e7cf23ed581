"""ContrastiveLoss: the siamese-pair loss of Hadsell et al., with the original's two variants."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape

# the original divides by (distance + 1e-4) in the gradient of the non-legacy dissimilar term
_GRAD_EPS = 1e-4


class _ContrastiveFunction(torch.autograd.Function):
    """Forward: the loss. Backward: the original's gradient, which for a dissimilar pair inside
    the margin is -(margin - d) / (d + 1e-4) * (a - b) / N (not / d: finite at d = 0)."""

    @staticmethod
    def forward(ctx, a, b, similar, margin, legacy):
        num = a.shape[0]
        diff = (a - b).reshape(num, -1)
        dist_sq = (diff * diff).sum(1)
        if legacy:
            dissimilar = torch.clamp(margin - dist_sq, min=0)
        else:
            dissimilar = torch.clamp(margin - torch.sqrt(dist_sq), min=0) ** 2
        loss = torch.where(similar, dist_sq, dissimilar).sum() / num / 2
        ctx.save_for_backward(diff, dist_sq, similar)
        ctx.margin, ctx.legacy, ctx.shape = margin, legacy, a.shape
        return loss

    @staticmethod
    def backward(ctx, grad):
        diff, dist_sq, similar = ctx.saved_tensors
        num = diff.shape[0]
        if ctx.legacy:
            inside = ctx.margin - dist_sq > 0
            coeff = -inside.to(diff.dtype)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = ctx.margin - dist
            coeff = torch.where(mdist > 0, -mdist / (dist + _GRAD_EPS), torch.zeros_like(dist))
        coeff = torch.where(similar, torch.ones_like(coeff), coeff)
        grad_a = (grad / num) * coeff.unsqueeze(1) * diff
        grad_a = grad_a.reshape(ctx.shape)
        return (grad_a if ctx.needs_input_grad[0] else None,
                -grad_a if ctx.needs_input_grad[1] else None, None, None, None)


@register_layer("ContrastiveLoss")
class ContrastiveLoss(CaffeLayer):
    """Bottoms a, b (N, C, 1, 1) and sim (N, 1, 1, 1); d = ||a - b||. A pair is similar when
    int(sim) != 0 (C++ truncation: 0.5 is dissimilar). loss = sum over pairs of d^2 (similar) or
    max(margin - d, 0)^2 (dissimilar; legacy_version: max(margin - d^2, 0)), divided by 2N.
    Gradients go to a and b (opposite signs); sim takes none."""
    BOTTOMS = (3, 3)
    IS_LOSS = True
    NO_GRAD_BOTTOMS = (2,)
    NO_FORCE_BACKWARD = (2,)     # force_backward leaves the similarity bottom alone

    def __init__(self, *, margin=1.0, legacy_version=False):
        super().__init__()
        self.margin, self.legacy_version = margin, legacy_version

    @classmethod
    def from_proto(cls, layer_param, ctx):
        a, b, sim = (legacy_shape(s, ctx, f"bottom {i}") for i, s in enumerate(ctx.bottom_shapes))
        if a[2:] != (1, 1) or b[2:] != (1, 1):
            raise ctx.error(f"bottoms 0 and 1 must have shape (N, C, 1, 1), got {ctx.bottom_shapes[0]} "
                            f"and {ctx.bottom_shapes[1]}")
        if a[:2] != b[:2]:
            raise ctx.error(f"bottoms 0 and 1 must have the same shape, got {ctx.bottom_shapes[0]} "
                            f"and {ctx.bottom_shapes[1]}")
        if sim[1:] != (1, 1, 1) or sim[0] != a[0]:
            raise ctx.error(f"the similarity bottom must have shape ({a[0]}, 1, 1, 1), one value "
                            f"per pair, got {ctx.bottom_shapes[2]}")
        p = layer_param.contrastive_loss_param
        return cls(margin=float(np.float32(p.margin)), legacy_version=bool(p.legacy_version))

    def forward(self, a, b, sim):
        similar = sim.detach().reshape(-1).to(torch.int64) != 0
        return _ContrastiveFunction.apply(a, b, similar, self.margin, self.legacy_version)

    def output_shapes(self, bottom_shapes):
        return [()]

    def extra_repr(self):
        return f"margin={self.margin}" + (", legacy_version=True" if self.legacy_version else "")
