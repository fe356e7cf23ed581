"""Im2col as a layer: (N, C, H, W) -> (N, C*K, Ho, Wo), channel c*K + i*kw + j."""
import torch.nn.functional as F

from ..layer import CaffeLayer, register_layer
from ..params import WindowSettings, canonical_axis, check_output_not_empty, conv_geometry


@register_layer("Im2col")
class Im2col(WindowSettings, CaffeLayer):
    """Zero-padded patches of every input channel, channel-major then kernel row then kernel
    column (F.unfold's order); Ho, Wo by the convolution rule. Backward is col2im (overlapping
    contributions summed). Geometry from `convolution_param` (num_output and bottom_is_im2col
    are ignored)."""

    def __init__(self, *, kernel, pad=(0, 0), stride=(1, 1), dilation=(1, 1)):
        super().__init__()
        self._set_window(kernel, pad, stride, dilation)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        cp = layer_param.convolution_param
        shape = tuple(ctx.bottom_shapes[0])
        if len(shape) != 4:
            raise ctx.unsupported(f"only 4-D (N, C, H, W) bottoms are supported, got shape {shape}")
        if canonical_axis(cp.axis, len(shape), ctx, "convolution_param.axis") != 1:
            raise ctx.unsupported(f"only convolution_param.axis 1 is supported, got {cp.axis}")
        geometry = conv_geometry(cp, ctx)
        check_output_not_empty(geometry, shape[2:], ctx)
        return cls(**geometry.as_kwargs())

    def output_shapes(self, bottom_shapes):
        n, c, h, w = bottom_shapes[0]
        out_h, out_w = (
            (size + 2 * p - (d * (k - 1) + 1)) // s + 1
            for size, k, p, s, d in zip((h, w), self.kernel, self.pad, self.stride, self.dilation))
        return [(n, c * self.kernel[0] * self.kernel[1], out_h, out_w)]

    def forward(self, x):
        n, c, h, w = x.shape
        out_h, out_w = (
            (size + 2 * p - (d * (k - 1) + 1)) // s + 1
            for size, k, p, s, d in zip((h, w), self.kernel, self.pad, self.stride, self.dilation))
        columns = F.unfold(x, self.kernel, self.dilation, self.pad, self.stride)
        return columns.reshape(n, c * self.kernel[0] * self.kernel[1], out_h, out_w)

    def extra_repr(self):
        return (f"kernel={self.kernel}, pad={self.pad}, stride={self.stride}, "
                f"dilation={self.dilation}")
