"""Crop (BVLC Caffe, used by FCN): cut bottom 0 to the size of bottom 1 from `axis` on."""
from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis


@register_layer("Crop")
class Crop(CaffeLayer):
    """top = bottom0[..., o_a : o_a + R_a, ..., o_last : o_last + R_last] for every axis a from
    `axis` on, where R = shape of bottom 1 (the reference) and o the offsets: none given = 0,
    one given = the same for every cropped axis, several = one per cropped axis. Axes before
    `axis` keep bottom 0's size. Only the reference's shape is read, so it gets no gradient;
    bottom 0's gradient is the top diff placed back at the crop window, zero elsewhere.

    The window size follows the reference's shape at every forward (a deploy net fed another
    image size crops to the new size), the offsets stay fixed."""
    BOTTOMS = (2, 2)

    def __init__(self, *, axis=2, offsets=(), where="Crop"):
        super().__init__()
        self.axis = axis
        self.offsets = tuple(int(o) for o in offsets)   # one per axis from `axis` on
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.crop_param
        data, reference = (tuple(s) for s in ctx.bottom_shapes)
        ndim = len(data)
        axis = canonical_axis(p.axis, ndim, ctx, "crop_param.axis")
        given = [int(o) for o in p.offset]
        cropped = ndim - axis
        if len(given) > 1 and len(given) != cropped:
            raise ctx.error(f"crop_param.offset has {len(given)} values; give one (for every axis) "
                            f"or one per cropped axis: {cropped} for axes {axis}..{ndim - 1} of a "
                            f"{ndim}-D bottom")
        if len(reference) < ndim:
            raise ctx.error(f"the reference bottom {ctx.bottom_names[1]!r} has {len(reference)} axes "
                            f"{reference}; it needs at least the {ndim} of bottom "
                            f"{ctx.bottom_names[0]!r} {data}")
        offsets = given * cropped if len(given) == 1 else (given or [0] * cropped)
        layer = cls(axis=axis, offsets=offsets, where=f"{ctx.name} ({ctx.type})")
        problem = layer._out_of_bounds(data, reference)
        if problem:
            raise ctx.error(problem)
        return layer

    def _out_of_bounds(self, data, reference):
        for i, offset in enumerate(self.offsets):
            a = self.axis + i
            if data[a] - offset < reference[a]:
                return (f"the crop of axis {a} is out of bounds: bottom 0 has size {data[a]} there, "
                        f"offset {offset} + the reference's size {reference[a]} = "
                        f"{offset + reference[a]} > {data[a]} (bottom shapes {tuple(data)} and "
                        f"{tuple(reference)})")
        return None

    def forward(self, x, reference):
        data_shape, ref_shape = tuple(x.shape), tuple(reference.shape)
        if len(ref_shape) < len(data_shape):
            raise ValueError(f"{self.where}: the reference bottom has {len(ref_shape)} axes "
                             f"{ref_shape}, fewer than bottom 0's {data_shape}")
        problem = self._out_of_bounds(data_shape, ref_shape)
        if problem:
            raise ValueError(f"{self.where}: {problem}")
        window = [slice(None)] * self.axis + [
            slice(o, o + ref_shape[self.axis + i]) for i, o in enumerate(self.offsets)]
        return x[tuple(window)]

    def extra_repr(self):
        return f"axis={self.axis}, offsets={self.offsets}"
