"""Simple loss layers: EuclideanLoss."""
import math

from ..layer import CaffeLayer, register_layer


@register_layer("EuclideanLoss")
class EuclideanLoss(CaffeLayer):
    """loss = sum((a - b)^2) / N / 2 (N = first dim); gradients +-(a - b) * dloss / N to both."""
    BOTTOMS = (2, 2)
    IS_LOSS = True
    NO_FORCE_BACKWARD = ()     # both bottoms are data: force_backward reaches both (Caffe)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        a, b = (tuple(s) for s in ctx.bottom_shapes)
        if not a or not b or a[0] != b[0]:
            raise ctx.error(f"both bottoms must have the same first dim (number of items), got "
                            f"{a} and {b}")
        if a != b and math.prod(a[1:]) != math.prod(b[1:]):
            raise ctx.error(f"bottoms must have the same number of values per item, got {a} and {b}")
        return cls()

    def forward(self, a, b):
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2

