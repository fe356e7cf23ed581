"""Per-channel layers with Caffe's own blobs -- BatchNorm, Scale, Bias, PReLU -- and LRN, as small
plain-torch definitions written into the exported module. Their parameters keep the layers'
names (mean_sum, variance_sum, scale_factor, scale, bias, slope), so the converted tensors load
unchanged, and they compute what the layer modules compute (forward and gradient)."""
import inspect

import numpy as np

from segaware_caffe.layers.lrn import caffe_lrn

from .registry import Emission, literal, register_emitter, register_helper

__all__ = ["emit_batch_norm", "emit_bias", "emit_lrn", "emit_prelu", "emit_scale"]

BATCH_NORM = register_helper("CaffeBatchNorm", '''class CaffeBatchNorm(nn.Module):
    """Caffe's BatchNorm per channel (axis 1): y = (x - mean) / sqrt(var + eps), the statistics
    treated as constants by the gradient. use_global_stats: the stored blobs over the stored
    factor (0 where the factor is 0); with update_global_stats the variance is the batch's around
    the stored mean and the blobs become moving sums. Otherwise the batch mean, over a per-channel
    divisor that starts at 0 and becomes sqrt(previous + eps) at every forward."""

    def __init__(self, channels, use_global_stats=True, update_global_stats=False,
                 moving_average_fraction=0.999, eps=1e-5):
        super().__init__()
        self.use_global_stats, self.update_global_stats = use_global_stats, update_global_stats
        self.moving_average_fraction, self.eps = moving_average_fraction, eps
        self.mean_sum = nn.Parameter(torch.zeros(channels))
        self.variance_sum = nn.Parameter(torch.zeros(channels))
        self.scale_factor = nn.Parameter(torch.zeros(1))
        self.register_buffer("batch_divisor", torch.zeros(channels), persistent=False)

    def forward(self, x):
        dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 1 else [0]
        shape = [1] * x.dim()
        if x.dim() > 1:
            shape[1] = x.shape[1]
        with torch.no_grad():
            if self.use_global_stats:
                stored = self.scale_factor[0]
                factor = torch.where(stored == 0, torch.zeros_like(stored), 1 / stored)
                mean = self.mean_sum * factor
                var = self.variance_sum * factor
                if self.update_global_stats:
                    var = (x - mean.reshape(shape)).square().mean(dims)
                    count = x.numel() // mean.numel()
                    correction = count / (count - 1) if count > 1 else 1.0
                    fraction = self.moving_average_fraction
                    self.scale_factor.mul_(fraction).add_(1)
                    self.mean_sum.mul_(fraction).add_(mean)
                    self.variance_sum.mul_(fraction).add_(correction * var)
                divisor = torch.sqrt(var + self.eps)
            else:
                mean = x.mean(dims)
                self.batch_divisor.copy_(torch.sqrt(self.batch_divisor + self.eps))
                divisor = self.batch_divisor.clone()
        return (x - mean.reshape(shape)) / divisor.reshape(shape)''')

BROADCAST = register_helper("caffe_broadcast", '''def caffe_broadcast(operand, ndim, axis):
    """A Scale/Bias operand shaped to broadcast against an ndim-D blob from `axis` on."""
    if operand.dim() == 0:
        return operand
    return operand.reshape((1,) * axis + tuple(operand.shape) + (1,) * (ndim - axis - operand.dim()))''')

SCALE = register_helper("CaffeScale", '''class CaffeScale(nn.Module):
    """Caffe's Scale: y = x * scale (+ bias), the operands broadcast from `axis` on; the scale is
    a learned blob of scale_shape, or bottom 1 when scale_shape is None; the bias (if any) a
    learned blob of bias_shape."""

    def __init__(self, scale_shape, bias_shape=None, axis=1):
        super().__init__()
        self.axis = axis
        self.scale = None if scale_shape is None else nn.Parameter(torch.ones(scale_shape))
        self.bias = None if bias_shape is None else nn.Parameter(torch.zeros(bias_shape))

    def forward(self, x, scale=None):
        scale = self.scale if scale is None else scale
        y = x * caffe_broadcast(scale, x.dim(), self.axis)
        if self.bias is not None:
            y = y + caffe_broadcast(self.bias, x.dim(), self.axis)
        return y''')

BIAS = register_helper("CaffeBias", '''class CaffeBias(nn.Module):
    """Caffe's Bias: y = x + bias, broadcast from `axis` on; a learned blob of `shape`, or
    bottom 1 when shape is None."""

    def __init__(self, shape, axis=1):
        super().__init__()
        self.axis = axis
        self.bias = None if shape is None else nn.Parameter(torch.zeros(shape))

    def forward(self, x, bias=None):
        bias = self.bias if bias is None else bias
        return x + caffe_broadcast(bias, x.dim(), self.axis)''')

PRELU = register_helper("CaffePReLU", '''class CaffePReLU(nn.Module):
    """Caffe's PReLU: y = x where x > 0, else slope * x; one slope per channel (axis 1), or one
    0-axis slope when channel_shared."""

    def __init__(self, channels, channel_shared=False):
        super().__init__()
        self.channel_shared = channel_shared
        self.slope = nn.Parameter(torch.full(() if channel_shared else (channels,), 0.25))

    def forward(self, x):
        slope = self.slope if self.channel_shared else \\
            self.slope.reshape(1, -1, *[1] * (x.dim() - 2))
        return torch.where(x > 0, x, x * slope)''')

LRN = register_helper("caffe_lrn", inspect.getsource(caffe_lrn))

FUNCTIONAL = ("import torch.nn.functional as F",)


@register_emitter("BatchNorm")
def emit_batch_norm(spec):
    kw = spec.kwargs
    args = [str(kw["channels"])]
    for name, default in (("use_global_stats", True), ("update_global_stats", False),
                          ("moving_average_fraction", 0.999), ("eps", 1e-5)):
        value = kw.get(name, default)
        # the proto's float defaults arrive rounded to float32
        if np.float32(value) != np.float32(default) or isinstance(default, bool) and value != default:
            args.append(f"{name}={literal(value)}")
    return Emission(f"{spec.attr}({spec.bottoms[0]})", module=f"CaffeBatchNorm({', '.join(args)})",
                    helpers=(BATCH_NORM,))


def _shape(value):
    return None if value is None else tuple(int(d) for d in value)


@register_emitter("Scale")
def emit_scale(spec):
    kw = spec.kwargs
    args = [literal(_shape(kw.get("scale_shape")))]
    if kw.get("bias_shape") is not None:
        args.append(literal(_shape(kw["bias_shape"])))
    if kw.get("axis", 1) != 1:
        args.append(f"axis={kw['axis']}")
    return Emission(f"{spec.attr}({', '.join(spec.bottoms)})",
                    module=f"CaffeScale({', '.join(args)})", helpers=(BROADCAST, SCALE))


@register_emitter("Bias")
def emit_bias(spec):
    kw = spec.kwargs
    args = [literal(_shape(kw.get("bias_shape")))] + \
        ([f"axis={kw['axis']}"] if kw.get("axis", 1) != 1 else [])
    return Emission(f"{spec.attr}({', '.join(spec.bottoms)})",
                    module=f"CaffeBias({', '.join(args)})", helpers=(BROADCAST, BIAS))


@register_emitter("PReLU")
def emit_prelu(spec):
    kw = spec.kwargs
    shared = ", channel_shared=True" if kw.get("channel_shared") else ""
    return Emission(f"{spec.attr}({spec.bottoms[0]})",
                    module=f"CaffePReLU({kw['channels']}{shared})", helpers=(PRELU,))


@register_emitter("LRN")
def emit_lrn(spec):
    kw = spec.kwargs
    across = kw.get("region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS"
    args = [spec.bottoms[0], str(kw.get("local_size", 5)), literal(kw.get("alpha", 1.0)),
            literal(kw.get("beta", 0.75)), literal(kw.get("k", 1.0)), str(across)]
    return Emission(f"caffe_lrn({', '.join(args)})", imports=FUNCTIONAL, helpers=(LRN,))
