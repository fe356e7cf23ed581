"""Clip (BVLC Caffe): limit values to [min, max]."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer


class _ClipFunction(torch.autograd.Function):
    """y = max(min, min(x, max)) in the order C++'s std::min/std::max compare (a NaN input gives
    `min`; min > max gives `min` everywhere). dx = dy where min <= x <= max, bounds included,
    0 elsewhere (the plain derivative would drop the gradient at the bounds)."""

    @staticmethod
    def forward(ctx, x, low, high):
        upper = torch.where(x > high, torch.full_like(x, high), x)        # std::min(x, high)
        y = torch.where(upper > low, upper, torch.full_like(x, low))      # std::max(low, .)
        ctx.save_for_backward(x)
        ctx.bounds = (low, high)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        low, high = ctx.bounds
        return grad_y * ((x >= low) & (x <= high)).to(grad_y.dtype), None, None


@register_layer("Clip")
class Clip(CaffeLayer):
    """y = clip(x, min, max); the gradient passes where min <= x <= max (bounds included)."""
    SAME_SHAPE = True

    def __init__(self, *, min, max):  # noqa: A002 (Caffe's field names)
        super().__init__()
        # the original compares in float32 (Dtype)
        self.min, self.max = float(np.float32(min)), float(np.float32(max))

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.clip_param
        missing = [f for f in ("min", "max") if not p.HasField(f)]
        if missing:
            raise ctx.error(f"clip_param.{' and clip_param.'.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} required")
        return cls(min=p.min, max=p.max)

    def forward(self, x):
        return _ClipFunction.apply(x, self.min, self.max)

    def extra_repr(self):
        return f"min={self.min}, max={self.max}"
