"""Permute (SSD fork): reorder the axes of a blob."""
from ..layer import CaffeLayer, register_layer


@register_layer("Permute")
class Permute(CaffeLayer):
    """top axis i = bottom axis order[i]; axes the order leaves out follow in their own order
    (so `order: 0 order: 2 order: 3 order: 1` turns NCHW into NHWC). Backward permutes back."""

    def __init__(self, *, order):
        super().__init__()
        self.order = tuple(order)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        ndim = len(ctx.bottom_shapes[0])
        given = [int(o) for o in layer_param.permute_param.order]
        for o in given:
            if o >= ndim:
                raise ctx.error(f"permute_param.order {o} is out of range for a {ndim}-D bottom "
                                f"(expected 0..{ndim - 1})")
        if len(set(given)) != len(given):
            raise ctx.error(f"permute_param.order repeats an axis: {given}")
        order = given + [i for i in range(ndim) if i not in given]
        return cls(order=order)

    def forward(self, x):
        if self.order == tuple(range(x.dim())):
            return x
        return x.permute(self.order).contiguous()

    def extra_repr(self):
        return f"order={self.order}"
