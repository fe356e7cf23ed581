"""Slice: cut a bottom into consecutive pieces along one axis."""
from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis


@register_layer("Slice")
class Slice(CaffeLayer):
    """Tops get [0, p1), [p1, p2), ..., [p_last, D) along `axis`; without slice points the axis is
    split into equal parts. Backward concatenates the top diffs."""
    TOPS = (1, None)

    def __init__(self, *, axis=1, slice_points=(), num_tops=1):
        super().__init__()
        self.axis = axis
        self.slice_points = tuple(slice_points)
        self.num_tops = num_tops

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.slice_param
        shape = tuple(ctx.bottom_shapes[0])
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise ctx.error("slice_param: give either axis or slice_dim (deprecated), not both")
        if p.HasField("slice_dim"):
            if p.slice_dim >= len(shape):
                raise ctx.error(f"slice_param.slice_dim {p.slice_dim} is out of range for a "
                                f"{len(shape)}-D bottom")
            axis = int(p.slice_dim)
        else:
            axis = canonical_axis(p.axis, len(shape), ctx, "slice_param.axis")
        num_tops = len(ctx.top_names)
        points = [int(v) for v in p.slice_point]
        size = shape[axis]
        if points:
            if len(points) != num_tops - 1:
                raise ctx.error(f"slice_param.slice_point needs one value fewer than the tops: got "
                                f"{len(points)} points for {num_tops} tops")
            previous = 0
            for point in points:
                if point <= previous:
                    raise ctx.error(f"slice_param.slice_point must be strictly increasing and > 0, "
                                    f"got {points}")
                previous = point
            if points[-1] >= size:
                raise ctx.error(f"slice_param.slice_point {points[-1]} leaves nothing for the last "
                                f"top: axis {axis} has size {size}")
        elif size % num_tops:
            raise ctx.error(f"without slice_point the axis is split equally: size {size} of axis "
                            f"{axis} is not divisible by {num_tops} tops")
        return cls(axis=axis, slice_points=points, num_tops=num_tops)

    def top_shares_bottom(self, top_index, num_bottoms):
        return self.num_tops == 1      # Caffe's Slice hands a single top the bottom's memory

    def output_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        size = shape[self.axis]
        if self.slice_points:
            bounds = (0, *self.slice_points, size)
            sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            sizes = [size // self.num_tops] * self.num_tops
        return [shape[:self.axis] + (s,) + shape[self.axis + 1:] for s in sizes]

    def forward(self, x):
        if self.num_tops == 1:
            return x
        size = x.shape[self.axis]
        if self.slice_points:
            bounds = (0, *self.slice_points, size)
            sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            sizes = [size // self.num_tops] * self.num_tops
        return tuple(x.split(sizes, dim=self.axis))

    def extra_repr(self):
        points = f", slice_points={self.slice_points}" if self.slice_points else ""
        return f"axis={self.axis}{points}, num_tops={self.num_tops}"
