"""SpatialProduct: multiply every channel by one spatial map."""
from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape


@register_layer("SpatialProduct")
class SpatialProduct(CaffeLayer):
    """Bottoms x (N, C, H, W) and m (N, 1, H, W) (at most 4 axes, missing ones being 1);
    y = x * m broadcast over the channels. dx = dy * m, dm = sum over channels of dy * x."""
    BOTTOMS = (2, 2)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        x, m = (tuple(s) for s in ctx.bottom_shapes)
        if len(x) < 2:
            raise ctx.error(f"the data bottom must have at least 2 axes (N, C, ...), got shape {x}")
        xl, ml = legacy_shape(x, ctx, "the data bottom"), legacy_shape(m, ctx, "the map bottom")
        if ml[1] != 1 or (ml[0], ml[2], ml[3]) != (xl[0], xl[2], xl[3]):
            raise ctx.error(f"the map bottom must have shape ({xl[0]}, 1, {xl[2]}, {xl[3]}) for data "
                            f"{x}, got {m}")
        return cls()

    def forward(self, x, m):
        shape = (x.shape[0], 1) + tuple(x.shape[2:])
        return x * m.reshape(shape)
