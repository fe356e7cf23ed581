"""Normalize (SSD fork): L2-normalise each image, over channels per position or over everything,
then multiply by a learned scale."""
import torch

from ..fillers import fill_parameter
from ..layer import CaffeLayer, register_layer
from .convolution import optional_filler


class _NormalizeFunction(torch.autograd.Function):
    """Forward and SSD's backward. The bottom diff SSD computes scales (dy - x (x.dy) / n^2) / n
    by the per-channel scale afterwards, which is the derivative only when the scale is one
    value; with a per-channel scale it differs from it, and we reproduce SSD."""

    @staticmethod
    def forward(ctx, x, scale, across_spatial, eps):
        num = x.shape[0]
        if across_spatial:
            flat = x.reshape(num, -1)
            norm = (flat.square().sum(1) + eps).sqrt().reshape((num,) + (1,) * (x.dim() - 1))
            normalised = x * (1.0 / norm)          # SSD multiplies by the reciprocal here
        else:
            norm = (eps + x.square().sum(1, keepdim=True)).sqrt()
            normalised = x / norm
        top = normalised * _per_channel(scale, x)
        ctx.save_for_backward(x, scale, norm, top)
        ctx.across_spatial = across_spatial
        return top

    @staticmethod
    def backward(ctx, dy):
        x, scale, norm, top = ctx.saved_tensors
        dx = dscale = None
        if ctx.needs_input_grad[1]:
            products = top * dy
            if scale.dim() == 0:
                dscale = products.sum() / scale
            else:
                dscale = products.transpose(0, 1).reshape(x.shape[1], -1).sum(1) / scale
        if ctx.needs_input_grad[0]:
            if ctx.across_spatial:
                a = (x * dy).reshape(x.shape[0], -1).sum(1).reshape(norm.shape)
            else:
                a = (x * dy).sum(1, keepdim=True)
            dx = (dy - x * a / norm / norm) / norm * _per_channel(scale, x)
        return dx, dscale, None, None


def _per_channel(scale, x):
    if scale.dim() == 0:
        return scale
    return scale.reshape((1, -1) + (1,) * (x.dim() - 2))


@register_layer("Normalize")
class Normalize(CaffeLayer):
    """y = scale * x / sqrt(sum(x^2) + eps), the sum over C*H*W of each image (across_spatial,
    the default) or over C at each position; scale is one learned value (channel_shared, the
    default) or one per channel (blob shape (C,)); default filler constant 1, eps 1e-10."""
    SAME_SHAPE = True
    CAFFE_BLOBS = ("scale",)

    def __init__(self, *, channels, across_spatial=True, channel_shared=True, eps=1e-10):
        super().__init__()
        self.across_spatial, self.channel_shared, self.eps = across_spatial, channel_shared, eps
        self.scale = self.new_parameter(() if channel_shared else (channels,), "scale", 1.0)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.norm_param
        shape = ctx.bottom_shapes[0]
        if len(shape) < 2:
            raise ctx.error(f"the bottom must have at least 2 axes (N, C, ...), got shape {shape}")
        if len(shape) > 4:
            raise ctx.error(f"the bottom must have at most 4 axes (N, C, H, W), got shape {shape}")
        if p.eps < 0:
            raise ctx.error(f"norm_param.eps must be >= 0, got {p.eps}")
        layer = cls(channels=int(shape[1]), across_spatial=bool(p.across_spatial),
                    channel_shared=bool(p.channel_shared), eps=float(p.eps))
        fill_parameter(layer.scale, optional_filler(p, "scale_filler"), ctx, default_value=1.0)
        return layer

    def forward(self, x):
        # eps is a float in SSD; the sum it is added to is float32 too
        eps = float(torch.tensor(self.eps, dtype=torch.float32))
        return _NormalizeFunction.apply(x, self.scale, self.across_spatial, eps)

    def extra_repr(self):
        return (f"across_spatial={self.across_spatial}, channel_shared={self.channel_shared}, "
                f"eps={self.eps:g}")
