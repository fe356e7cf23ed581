"""Softmax over one axis."""
import torch

from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis


@register_layer("Softmax")
class Softmax(CaffeLayer):
    """y = exp(x - max) / sum exp(x - max) over `axis` (default 1); dx = y * (dy - sum(dy * y))."""
    SAME_SHAPE = True

    def __init__(self, *, axis=1):
        super().__init__()
        self.axis = axis

    @classmethod
    def from_proto(cls, layer_param, ctx):
        axis = canonical_axis(layer_param.softmax_param.axis, len(ctx.bottom_shapes[0]), ctx,
                              "softmax_param.axis")
        return cls(axis=axis)

    def forward(self, x):
        return torch.softmax(x, dim=self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"
