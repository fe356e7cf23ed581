"""Reshape: new dims for a range of axes (0 = copy the bottom dim, -1 = infer); shares data."""
import math

from ..layer import CaffeLayer, register_layer


def reshape_top_shape(bottom_shape, dims, axis, num_axes):
    """Caffe's Reshape rule: the bottom axes [start, end) are replaced by `dims`.

    Raises ValueError with the reason when the request cannot be met.
    """
    ndim = len(bottom_shape)
    start = axis if axis >= 0 else ndim + axis + 1
    if not 0 <= start <= ndim:
        raise ValueError(f"reshape_param.axis {axis} is out of range for a {ndim}-D bottom "
                         f"(expected {-ndim - 1}..{ndim})")
    end = ndim if num_axes == -1 else start + num_axes
    if end > ndim:
        raise ValueError(f"reshape_param axis {axis} + num_axes {num_axes} reach past the "
                         f"bottom's {ndim} axes")
    replaced = list(dims)
    inferred = None
    for i, dim in enumerate(dims):
        if dim == 0:
            if start + i >= ndim:
                raise ValueError(f"reshape_param.shape dim {i} is 0 (copy) but the bottom has no "
                                 f"axis {start + i} to copy")
            replaced[i] = bottom_shape[start + i]
        elif dim == -1:
            inferred = i
    shape = list(bottom_shape[:start]) + replaced + list(bottom_shape[end:])
    count = math.prod(bottom_shape)
    if inferred is not None:
        known = math.prod(d for j, d in enumerate(shape) if j != start + inferred)
        if known == 0 or count % known:
            raise ValueError(f"cannot infer the -1 dim: bottom count {count} (shape "
                             f"{tuple(bottom_shape)}) is not a multiple of {known}")
        shape[start + inferred] = count // known
    if math.prod(shape) != count:
        raise ValueError(f"top shape {tuple(shape)} has {math.prod(shape)} elements but the bottom "
                         f"{tuple(bottom_shape)} has {count}")
    return tuple(shape)


@register_layer("Reshape")
class Reshape(CaffeLayer):
    """y = x viewed with the shape from reshape_param (shape dims, axis 0, num_axes -1)."""
    SHARES_BOTTOM_DATA = True

    def __init__(self, *, dims, axis=0, num_axes=-1):
        super().__init__()
        self.dims, self.axis, self.num_axes = tuple(dims), axis, num_axes

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.reshape_param
        dims = [int(d) for d in p.shape.dim]
        if sum(d == -1 for d in dims) > 1:
            raise ctx.error(f"reshape_param.shape may infer (-1) at most one dim, got {dims}")
        if any(d < -1 for d in dims):
            raise ctx.error(f"reshape_param.shape dims must be >= -1, got {dims}")
        if p.num_axes < -1:
            raise ctx.error(f"reshape_param.num_axes must be >= -1, got {p.num_axes}")
        try:
            reshape_top_shape(tuple(ctx.bottom_shapes[0]), dims, p.axis, p.num_axes)
        except ValueError as e:
            raise ctx.error(str(e)) from None
        return cls(dims=dims, axis=int(p.axis), num_axes=int(p.num_axes))

    def forward(self, x):
        return x.reshape(reshape_top_shape(tuple(x.shape), self.dims, self.axis, self.num_axes))

    def extra_repr(self):
        return f"dims={self.dims}, axis={self.axis}, num_axes={self.num_axes}"
