"""Scale: broadcast multiply by a learned blob or a second bottom, optional bias."""
import torch

from ..fillers import fill_parameter
from ..layer import CaffeLayer, register_layer
from .bias import broadcast_view, operand_shape
from .convolution import optional_filler


@register_layer("Scale")
class Scale(CaffeLayer):
    """y = x * broadcast(scale) (+ broadcast(bias)). The scale is bottom 1 if given, else a learned
    blob of shape x.shape[axis:axis+num_axes] (num_axes -1: to the end, 0: a 0-axis scalar;
    default filler constant 1). With bias_term the bias blob has the scale's shape (default
    filler constant 0). Blobs: [scale, bias], or [bias] alone with two bottoms."""
    SAME_SHAPE = True
    BOTTOMS = (1, 2)
    CAFFE_BLOBS = ("scale", "bias")

    def __init__(self, *, axis=1, scale_shape=None, bias_shape=None):
        super().__init__()
        self.axis = axis
        self.scale = None if scale_shape is None else self.new_parameter(scale_shape, "scale", 1.0)
        self.bias = None if bias_shape is None else self.new_parameter(bias_shape, "bias")

    @classmethod
    def from_proto(cls, layer_param, ctx):
        sp = layer_param.scale_param
        axis, shape = operand_shape(sp, ctx.bottom_shapes, ctx, "scale")
        two_bottoms = len(ctx.bottom_shapes) > 1
        layer = cls(axis=axis, scale_shape=None if two_bottoms else shape,
                    bias_shape=shape if sp.bias_term else None)
        if layer.scale is not None:
            fill_parameter(layer.scale, optional_filler(sp, "filler"), ctx, default_value=1.0,
                           holds=1.0)
        if layer.bias is not None:
            fill_parameter(layer.bias, optional_filler(sp, "bias_filler"), ctx, holds=0.0)
        return layer

    def forward(self, x, scale=None):
        if scale is None:
            scale = self.scale
        y = x * broadcast_view(scale, x.dim(), self.axis)
        if self.bias is not None:
            y = y + broadcast_view(self.bias, x.dim(), self.axis)
        return y

    def extra_repr(self):
        shape = "from bottom 1" if self.scale is None else tuple(self.scale.shape)
        return f"axis={self.axis}, scale={shape}, bias_term={self.bias is not None}"
