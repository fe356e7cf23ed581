"""Bias: broadcast add of a learned blob or of a second bottom."""
import torch

from ..fillers import fill_parameter
from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis
from .convolution import optional_filler


def broadcast_view(operand, ndim, axis):
    """`operand` reshaped to broadcast against an `ndim`-D blob, its axes matching the blob's
    axes from `axis` on (a 0-axis operand is a plain scalar)."""
    if operand.dim() == 0:
        return operand
    trailing = ndim - axis - operand.dim()
    return operand.reshape((1,) * axis + tuple(operand.shape) + (1,) * trailing)


def operand_shape(param, bottom_shapes, ctx, kind):
    """(axis, shape) of the scale/bias operand of a Scale or Bias layer: with two bottoms the
    whole of bottom 1 (a 0-axis bottom 1 means axis 0), else bottom_shape[axis:axis+num_axes]
    (num_axes -1: to the end; 0: a 0-axis scalar). Checks that it fits bottom 0."""
    field = "scale_param" if kind == "scale" else "bias_param"
    shape = tuple(bottom_shapes[0])
    if len(bottom_shapes) > 1:
        operand = tuple(bottom_shapes[1])
        axis = 0 if not operand else canonical_axis(param.axis, len(shape), ctx, f"{field}.axis")
        fits = (axis + len(operand) <= len(shape)
                and shape[axis:axis + len(operand)] == operand)
        if not fits:
            raise ctx.error(f"the {kind} bottom's shape {operand} must match the data bottom's "
                            f"shape {shape} from axis {axis} on")
        return axis, operand
    if param.num_axes < -1:
        raise ctx.error(f"{field}.num_axes must be >= -1, got {param.num_axes}")
    axis = canonical_axis(param.axis, len(shape), ctx, f"{field}.axis") if shape else 0
    if param.num_axes == -1:
        return axis, shape[axis:]
    if axis + param.num_axes > len(shape):
        raise ctx.error(f"{field}: axis {axis} + num_axes {param.num_axes} runs past the "
                        f"bottom's {len(shape)} axes (shape {shape})")
    return (0, ()) if param.num_axes == 0 else (axis, shape[axis:axis + param.num_axes])


@register_layer("Bias")
class Bias(CaffeLayer):
    """y = x + broadcast(bias); the bias is bottom 1 if given, else a learned blob of shape
    x.shape[axis:axis+num_axes] (default filler constant 0)."""
    SAME_SHAPE = True
    BOTTOMS = (1, 2)
    CAFFE_BLOBS = ("bias",)

    def __init__(self, *, axis=1, bias_shape=None):
        super().__init__()
        self.axis = axis
        self.bias = None if bias_shape is None else self.new_parameter(bias_shape, "bias")

    @classmethod
    def from_proto(cls, layer_param, ctx):
        bp = layer_param.bias_param
        axis, shape = operand_shape(bp, ctx.bottom_shapes, ctx, "bias")
        if len(ctx.bottom_shapes) > 1:
            return cls(axis=axis)
        layer = cls(axis=axis, bias_shape=shape)
        fill_parameter(layer.bias, optional_filler(bp, "filler"), ctx, holds=0.0)
        return layer

    def forward(self, x, bias=None):
        if bias is None:
            bias = self.bias
        return x + broadcast_view(bias, x.dim(), self.axis)

    def extra_repr(self):
        shape = "from bottom 1" if self.bias is None else tuple(self.bias.shape)
        return f"axis={self.axis}, bias={shape}"
