"""MVN: mean (and variance) normalisation per channel or per item."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape


class _MVNFunction(torch.autograd.Function):
    """y = (x - mean) / (std + eps) over each row of a (rows, dim) view, with the original's
    backward dx = (dy - mean(dy) - y mean(y dy)) / (std + eps): the exact derivative divides its
    last term by std instead (the two agree where eps << std)."""

    @staticmethod
    def forward(ctx, x, eps):
        centred = x - x.mean(1, keepdim=True)
        std = torch.sqrt((centred * centred).mean(1, keepdim=True)) + eps
        y = centred / std
        ctx.save_for_backward(y, std)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, std = ctx.saved_tensors
        dim = y.shape[1]
        dx = grad - (y * (y * grad).sum(1, keepdim=True) + grad.sum(1, keepdim=True)) / dim
        return dx / std, None


@register_layer("MVN")
class MVN(CaffeLayer):
    """y = x - mean, then (normalize_variance, default) divided by sqrt(E[(x - mean)^2]) + eps
    (eps is added to the standard deviation). Statistics per (item, channel) over H*W, or per item
    over C*H*W with across_channels. The bottom has at most 4 axes and the top is always
    (N, C, H, W), missing trailing axes being 1, as in the original."""

    def __init__(self, *, normalize_variance=True, across_channels=False, eps=1e-9):
        super().__init__()
        self.normalize_variance, self.across_channels = normalize_variance, across_channels
        self.eps = eps

    @classmethod
    def from_proto(cls, layer_param, ctx):
        legacy_shape(ctx.bottom_shapes[0], ctx)
        p = layer_param.mvn_param
        return cls(normalize_variance=bool(p.normalize_variance),
                   across_channels=bool(p.across_channels), eps=float(np.float32(p.eps)))

    def forward(self, x):
        shape = tuple(x.shape) + (1,) * (4 - x.dim())
        rows = shape[0] if self.across_channels else shape[0] * shape[1]
        x2 = x.reshape(rows, -1)
        if self.normalize_variance:
            y = _MVNFunction.apply(x2, self.eps)
        else:
            y = x2 - x2.mean(1, keepdim=True)
        return y.reshape(shape)

    def extra_repr(self):
        parts = [] if self.normalize_variance else ["normalize_variance=False"]
        parts += ["across_channels=True"] if self.across_channels else []
        return ", ".join(parts + [f"eps={self.eps:g}"])
