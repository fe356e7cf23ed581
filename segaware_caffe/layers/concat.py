"""Concat: join bottoms along one axis, in bottom order."""
import torch

from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis


@register_layer("Concat")
class Concat(CaffeLayer):
    """y = cat(bottoms, axis); every other dim must match. Backward splits the top diff."""
    BOTTOMS = (1, None)

    def __init__(self, *, axis=1):
        super().__init__()
        self.axis = axis

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.concat_param
        shapes = [tuple(s) for s in ctx.bottom_shapes]
        ndim = len(shapes[0])
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise ctx.error("concat_param: give either axis or concat_dim (deprecated), not both")
        if p.HasField("concat_dim"):
            if p.concat_dim >= ndim:
                raise ctx.error(f"concat_param.concat_dim {p.concat_dim} is out of range for a "
                                f"{ndim}-D bottom")
            axis = int(p.concat_dim)
        else:
            axis = canonical_axis(p.axis, ndim, ctx, "concat_param.axis")
        for name, shape in zip(ctx.bottom_names[1:], shapes[1:]):
            if len(shape) != ndim or any(a != b for i, (a, b) in enumerate(zip(shape, shapes[0]))
                                         if i != axis):
                raise ctx.error(f"bottoms must match in every dim except axis {axis}: bottom "
                                f"{name!r} has shape {shape}, bottom {ctx.bottom_names[0]!r} "
                                f"has {shapes[0]}")
        return cls(axis=axis)

    def output_shapes(self, bottom_shapes):
        shape = list(bottom_shapes[0])
        shape[self.axis] = sum(s[self.axis] for s in bottom_shapes)
        return [tuple(shape)]

    def top_shares_bottom(self, top_index, num_bottoms):
        return num_bottoms == 1      # Caffe's Concat hands a single bottom's memory to the top

    def forward(self, *bottoms):
        if len(bottoms) == 1:
            return bottoms[0]
        return torch.cat(bottoms, dim=self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"
