"""InnerProduct: fully connected over all axes from `axis` on."""
import math

import torch

from ..fillers import fill_parameter
from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis
from .convolution import optional_filler


@register_layer("InnerProduct")
class InnerProduct(CaffeLayer):
    """y = x_flat . W^T + b, x_flat = x reshaped to (prod(shape[:axis]), K), K = prod(shape[axis:]).
    Weight (num_output, K), or (K, num_output) with `transpose: true`; bias (num_output)."""
    CAFFE_BLOBS = ("weight", "bias")

    def __init__(self, *, num_output, input_size, axis=1, bias_term=True, transpose=False):
        super().__init__()
        self.axis = axis
        self.transpose = transpose
        shape = (input_size, num_output) if transpose else (num_output, input_size)
        self.weight = self.new_parameter(shape, "weight")
        self.bias = self.new_parameter((num_output,), "bias") if bias_term else None

    @property
    def num_output(self):
        return self.weight.shape[1 if self.transpose else 0]

    @classmethod
    def from_proto(cls, layer_param, ctx):
        ip = layer_param.inner_product_param
        if not ip.HasField("num_output") or ip.num_output <= 0:
            raise ctx.error("inner_product_param.num_output is required and must be > 0, "
                            f"got {ip.num_output if ip.HasField('num_output') else 'nothing'}")
        shape = tuple(ctx.bottom_shapes[0])
        axis = canonical_axis(ip.axis, len(shape), ctx, "inner_product_param.axis")
        layer = cls(num_output=ip.num_output, input_size=math.prod(shape[axis:]), axis=axis,
                    bias_term=ip.bias_term, transpose=ip.transpose)
        fill_parameter(layer.weight, optional_filler(ip, "weight_filler"), ctx, holds=0.0)
        if layer.bias is not None:
            fill_parameter(layer.bias, optional_filler(ip, "bias_filler"), ctx, holds=0.0)
        return layer

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])[:self.axis] + (self.num_output,)]

    def forward(self, x):
        lead = x.shape[:self.axis]
        flat = x.reshape(math.prod(lead), -1)
        weight = self.weight.t() if self.transpose else self.weight
        y = torch.nn.functional.linear(flat, weight, self.bias)
        return y.reshape(*lead, self.num_output)

    def extra_repr(self):
        parts = [f"num_output={self.num_output}"]
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        if self.transpose:
            parts.append("transpose=True")
        if self.bias is None:
            parts.append("bias_term=False")
        return ", ".join(parts)
