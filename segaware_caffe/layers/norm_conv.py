"""NormConv: convolution with per-pixel softmax attention over embedding distances.

Bottoms: 0 = x (N, C, H, W), 1 = embedding (N, E, H, W) of the same batch and spatial size.
Blobs, Caffe order: weight (O, C/group, kh, kw), bias (O) if bias_term, scale (1) if scale_term.

Deviation: the original leaves the gradient of bottom 0 unwritten for 1x1 stride-1 pad-0 layers
(both its CPU and its GPU path are broken there); we give the exact gradient. bottom_is_im2col is
refused at build time (no released net uses it with NormConv).
"""
import torch

from segaware_caffe.kernels.norm_conv import norm_conv

from ..fillers import fill_parameter
from ..layer import CaffeLayer, register_layer
from ..params import ConvGeometry, conv_geometry

_NORMS = {1: "L1", 2: "L2"}   # NormConvParameter.Norm enum values


def _optional_filler(message, field):
    return getattr(message, field) if message.HasField(field) else None


@register_layer("NormConv")
class NormConv(CaffeLayer):
    USES_SEGAWARE_KERNELS = True
    BOTTOMS = (2, 2)
    TOPS = (1, 1)
    CAFFE_BLOBS = ("weight", "bias", "scale")

    def __init__(self, *, weight_shape, bias_term=True, scale_term=True, kernel, pad=(0, 0),
                 stride=(1, 1), dilation=(1, 1), group=1, norm="L2", remove_center=False,
                 remove_bounds=False):
        super().__init__()
        self.kernel, self.pad = tuple(kernel), tuple(pad)
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.group = group
        self.norm = norm
        self.remove_center, self.remove_bounds = remove_center, remove_bounds
        self.scale_term = scale_term
        self.weight = self.new_parameter(weight_shape, "weight")
        self.bias = self.new_parameter((weight_shape[0],), "bias") if bias_term else None
        self.scale = self.new_parameter((1,), "scale") if scale_term else None

    @classmethod
    def from_proto(cls, layer_param, ctx):
        cp = layer_param.convolution_param
        ncp = layer_param.norm_conv_param
        if not cp.HasField("num_output") or cp.num_output <= 0:
            raise ctx.error("convolution_param.num_output is required and must be > 0, got "
                            f"{cp.num_output if cp.HasField('num_output') else 'nothing'}")
        if cp.bottom_is_im2col:
            raise ctx.unsupported("convolution_param.bottom_is_im2col is not supported for NormConv "
                                  "(no released net uses it)")
        x_shape, emb_shape = (tuple(s) for s in ctx.bottom_shapes)
        if len(x_shape) != 4 or len(emb_shape) != 4:
            raise ctx.error(f"both bottoms must be 4-D (N, C, H, W), got {x_shape} and {emb_shape}")
        if cp.axis not in (1, -3):
            raise ctx.error(f"convolution_param.axis must be 1 (the channel axis of a 4-D bottom), "
                            f"got {cp.axis}")
        if x_shape[0] != emb_shape[0] or x_shape[2:] != emb_shape[2:]:
            raise ctx.error(f"bottom 1 (the embedding) must match bottom 0's batch and spatial size "
                            f"{(x_shape[0], x_shape[2], x_shape[3])}, got {emb_shape}")
        geometry = conv_geometry(cp, ctx)
        channels, group = x_shape[1], cp.group
        if group <= 0 or channels % group or cp.num_output % group:
            raise ctx.error(f"convolution_param.group {group} must divide the {channels} bottom "
                            f"channels and num_output {cp.num_output}")
        out_h, out_w = geometry.output_size(*x_shape[2:])
        if out_h <= 0 or out_w <= 0:
            raise ctx.error(f"the bottom's spatial size {x_shape[2:]} gives an empty output "
                            f"{(out_h, out_w)} (kernel {geometry.kernel}, pad {geometry.pad}, "
                            f"stride {geometry.stride}, dilation {geometry.dilation})")
        layer = cls(weight_shape=(cp.num_output, channels // group, *geometry.kernel),
                    bias_term=cp.bias_term, scale_term=ncp.scale_term, **geometry.as_kwargs(),
                    group=group, norm=_NORMS[ncp.norm], remove_center=ncp.remove_center,
                    remove_bounds=ncp.remove_bounds)
        fill_parameter(layer.weight, _optional_filler(cp, "weight_filler"), ctx)
        if layer.bias is not None:
            fill_parameter(layer.bias, _optional_filler(cp, "bias_filler"), ctx)
        if layer.scale is not None:  # the original's scale filler defaults to constant 0
            fill_parameter(layer.scale, _optional_filler(ncp, "scale_filler"), ctx)
        return layer

    def forward(self, x, emb):
        return norm_conv(x, emb, self.weight, self.bias, self.scale, kernel_size=self.kernel,
                         pad=self.pad, stride=self.stride, dilation=self.dilation, group=self.group,
                         norm=self.norm, remove_center=self.remove_center,
                         remove_bounds=self.remove_bounds, scale_term=self.scale_term)

    def forward_workspace(self, bottom_shapes, top_shapes, itemsize):
        # padded copies of both bottoms (the distances and the convolution), the (N, K, Ho, Wo)
        # attention and one tap's temporaries
        geometry = ConvGeometry(self.kernel, self.pad, self.stride, self.dilation)
        x, emb = bottom_shapes
        out_h, out_w = (max(0, d) for d in geometry.output_size(*x[2:]))
        attention = x[0] * geometry.taps * out_h * out_w * itemsize
        return (geometry.tap_loop_workspace(x, itemsize) + geometry.tap_loop_workspace(emb, itemsize)
                + 2 * attention)

    def extra_repr(self):
        parts = [f"num_output={self.weight.shape[0]}", f"kernel={self.kernel}"]
        for name, default in (("pad", (0, 0)), ("stride", (1, 1)), ("dilation", (1, 1)),
                              ("group", 1), ("norm", "L2"), ("remove_center", False),
                              ("remove_bounds", False), ("scale_term", True)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)}")
        if self.bias is None:
            parts.append("bias_term=False")
        return ", ".join(parts)
