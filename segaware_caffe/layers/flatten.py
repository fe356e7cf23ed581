"""Flatten: collapse the axes [axis, end_axis] into one; shares data."""
from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis


@register_layer("Flatten")
class Flatten(CaffeLayer):
    """y = x with axes axis..end_axis (defaults 1 and -1) merged."""

    def __init__(self, *, axis=1, end_axis=-1):
        super().__init__()
        self.axis, self.end_axis = axis, end_axis

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.flatten_param
        ndim = len(ctx.bottom_shapes[0])
        axis = canonical_axis(p.axis, ndim, ctx, "flatten_param.axis")
        end_axis = canonical_axis(p.end_axis, ndim, ctx, "flatten_param.end_axis")
        if end_axis < axis:
            raise ctx.error(f"flatten_param.end_axis ({p.end_axis} -> {end_axis}) must not come "
                            f"before axis ({p.axis} -> {axis})")
        return cls(axis=axis, end_axis=end_axis)

    def forward(self, x):
        return x.flatten(self.axis, self.end_axis)

    def extra_repr(self):
        return f"axis={self.axis}, end_axis={self.end_axis}"
