"""Tile: repeat the block from `axis` onward `tiles` times along `axis`."""
from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis


@register_layer("Tile")
class Tile(CaffeLayer):
    """top[outer, t*D + d, inner] = bottom[outer, d, inner] for t < tiles (D = bottom dim at axis);
    backward sums the copies."""

    def __init__(self, *, axis=1, tiles):
        super().__init__()
        self.axis, self.tiles = axis, tiles

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.tile_param
        if not p.HasField("tiles"):
            raise ctx.error("tile_param.tiles is required (the number of copies along the axis)")
        if p.tiles <= 0:
            raise ctx.error(f"tile_param.tiles must be > 0, got {p.tiles}")
        axis = canonical_axis(p.axis, len(ctx.bottom_shapes[0]), ctx, "tile_param.axis")
        return cls(axis=axis, tiles=int(p.tiles))

    def output_shapes(self, bottom_shapes):
        shape = list(bottom_shapes[0])
        shape[self.axis] *= self.tiles
        return [tuple(shape)]

    def forward(self, x):
        repeats = [1] * x.dim()
        repeats[self.axis] = self.tiles
        return x.repeat(repeats)

    def extra_repr(self):
        return f"axis={self.axis}, tiles={self.tiles}"
