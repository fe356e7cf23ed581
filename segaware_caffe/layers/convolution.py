"""Convolution and Deconvolution (Caffe engine), with the fork's `bottom_is_im2col`.

Both take one or more bottoms of the same shape and give one top per bottom, all computed with the
same weights. The channel axis is `convolution_param.axis` (default 1); the axes before it are
batch axes and exactly two spatial axes must follow it.
"""
import math

import torch
import torch.nn.functional as F

from ..fillers import fill_parameter
from ..layer import CaffeLayer, register_layer
from ..params import WindowSettings, canonical_axis, conv_geometry


def optional_filler(message, field):
    """The FillerParameter `field` of `message` if the prototxt gives it, else None (the layer's
    default filler)."""
    return getattr(message, field) if message.HasField(field) else None


class _ConvolutionBase(WindowSettings, CaffeLayer):
    BOTTOMS = (1, None)
    TOPS = (1, None)
    CAFFE_BLOBS = ("weight", "bias")

    def __init__(self, *, weight_shape, bias_term=True, kernel, pad=(0, 0), stride=(1, 1),
                 dilation=(1, 1), group=1, channel_axis=1):
        super().__init__()
        self._set_window(kernel, pad, stride, dilation)
        self.group = group
        self.channel_axis = channel_axis
        self.weight = self.new_parameter(weight_shape, "weight")
        self.bias = self.new_parameter((self.num_output,), "bias") if bias_term else None

    @property
    def num_output(self):
        raise NotImplementedError

    @classmethod
    def _read_proto(cls, layer_param, ctx):
        """Common parameter reading and validation; returns the keyword arguments of __init__
        (minus weight_shape), the bottom channel count and the fillers."""
        cp = layer_param.convolution_param
        if not cp.HasField("num_output") or cp.num_output <= 0:
            raise ctx.error("convolution_param.num_output is required and must be > 0, "
                            f"got {cp.num_output if cp.HasField('num_output') else 'nothing'}")
        if cp.group <= 0:
            raise ctx.error(f"convolution_param.group must be > 0, got {cp.group}")
        if ctx.bottom_names and len(ctx.top_names) != len(ctx.bottom_names):
            raise ctx.error(f"needs one top per bottom, got {len(ctx.bottom_names)} bottoms and "
                            f"{len(ctx.top_names)} tops")
        shape = tuple(ctx.bottom_shapes[0])
        for other in ctx.bottom_shapes[1:]:
            if tuple(other) != shape:
                raise ctx.error(f"all bottoms must have the same shape, got {shape} and {tuple(other)}")
        channel_axis = canonical_axis(cp.axis, len(shape), ctx, "convolution_param.axis")
        spatial_axes = len(shape) - channel_axis - 1
        if spatial_axes != 2:
            raise ctx.unsupported(f"only 2-D convolution is supported; the bottom {shape} has "
                                  f"{spatial_axes} spatial axes after channel axis {channel_axis}")
        geometry = conv_geometry(cp, ctx)
        channels = shape[channel_axis]
        if channels % cp.group:
            raise ctx.error(f"convolution_param.group {cp.group} does not divide the {channels} "
                            f"bottom channels")
        if cp.num_output % cp.group:
            raise ctx.error(f"convolution_param.group {cp.group} does not divide num_output "
                            f"{cp.num_output}")
        kwargs = dict(bias_term=cp.bias_term, **geometry.as_kwargs(), group=cp.group,
                      channel_axis=channel_axis)
        return kwargs, shape, channels, cp

    def _fill_blobs(self, cp, ctx):
        fill_parameter(self.weight, optional_filler(cp, "weight_filler"), ctx, holds=0.0)
        if self.bias is not None:
            fill_parameter(self.bias, optional_filler(cp, "bias_filler"), ctx, holds=0.0)

    def _check_output_size(self, shape, ctx):
        height, width = shape[self.channel_axis + 1:]
        out = self.output_spatial_size(height, width)
        if min(out) <= 0:
            raise ctx.error(f"the bottom's spatial size {(height, width)} gives an empty output "
                            f"{out} (kernel {self.kernel}, pad {self.pad}, stride {self.stride}, "
                            f"dilation {self.dilation})")

    def output_spatial_size(self, height, width):
        """Caffe's floor rule for convolution, its inverse for deconvolution."""
        if self.TYPE == "Deconvolution":
            return self.geometry.deconv_output_size(height, width)
        return self.geometry.output_size(height, width)

    def output_shapes(self, bottom_shapes):
        shapes = []
        for shape in bottom_shapes:
            shape = tuple(shape)
            out = self.output_spatial_size(*shape[self.channel_axis + 1:])
            shapes.append(shape[:self.channel_axis] + (self.num_output,) + tuple(out))
        return shapes

    def forward(self, *bottoms):
        tops = tuple(self._convolve_batched(x) for x in bottoms)
        return tops[0] if len(tops) == 1 else tops

    def forward_workspace(self, bottom_shapes, top_shapes, itemsize):
        # torch's CPU paths that unfold (dilated or large kernels, no oneDNN) hold one image's
        # columns at a time: (weight channels x kh x kw) rows over the pixels of the convolved side
        if getattr(self, "bottom_is_im2col", False) or not bottom_shapes:
            return 0
        side = top_shapes[0] if self.TYPE != "Deconvolution" else bottom_shapes[0]
        pixels = math.prod(side[self.channel_axis + 1:])
        return self.weight.shape[1] * self.kernel[0] * self.kernel[1] * pixels * itemsize

    def _convolve_batched(self, x):
        # Axes before the channel axis are all batch axes (Caffe's num_ = count(0, axis)).
        lead = x.shape[:self.channel_axis]
        y = self._convolve(x.reshape(-1, *x.shape[self.channel_axis:]))
        return y.reshape(*lead, *y.shape[1:])

    def extra_repr(self):
        parts = [f"num_output={self.num_output}", f"kernel={self.kernel}"]
        for name, default in (("pad", (0, 0)), ("stride", (1, 1)), ("dilation", (1, 1)),
                              ("group", 1), ("channel_axis", 1)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)}")
        if self.bias is None:
            parts.append("bias_term=False")
        return ", ".join(parts)


@register_layer("Convolution")
class Convolution(_ConvolutionBase):
    """y = conv2d(x, W, b) with weight (O, C/group, kh, kw), output floor((H+2p-ext)/s)+1.

    With `bottom_is_im2col` the bottom is an Im2col blob (N, C*K, H, W): the output keeps its
    spatial size and y = W_flat . in + b per group, W_flat the weight as (O, C*K/group) in
    (c, i, j) order; pad, stride and dilation are ignored.
    """

    def __init__(self, *, bottom_is_im2col=False, **kwargs):
        super().__init__(**kwargs)
        self.bottom_is_im2col = bottom_is_im2col

    @property
    def num_output(self):
        return self.weight.shape[0]

    @classmethod
    def from_proto(cls, layer_param, ctx):
        kwargs, shape, channels, cp = cls._read_proto(layer_param, ctx)
        kh, kw = kwargs["kernel"]
        per_group = channels // cp.group
        if cp.bottom_is_im2col:
            if per_group % (kh * kw):
                raise ctx.error(f"bottom_is_im2col: the {per_group} column channels per group "
                                f"(bottom channels {channels} / group {cp.group}) are not a "
                                f"multiple of the kernel's {kh}x{kw} = {kh * kw} taps")
            per_group //= kh * kw
        layer = cls(weight_shape=(cp.num_output, per_group, kh, kw),
                    bottom_is_im2col=cp.bottom_is_im2col, **kwargs)
        layer._check_output_size(shape, ctx)
        layer._fill_blobs(cp, ctx)
        return layer

    def output_spatial_size(self, height, width):
        if self.bottom_is_im2col:
            return (height, width)
        return super().output_spatial_size(height, width)

    @property
    def pointwise(self):
        """Whether each output pixel is the weights (O, C) times that pixel's channels: one
        group, and an im2col bottom or a 1x1 kernel with stride 1 and no pad."""
        return self.group == 1 and (self.bottom_is_im2col or (
            self.kernel == (1, 1) and self.stride == (1, 1) and self.pad == (0, 0)))

    def _convolve(self, x):
        if self.pointwise and _batched_product_is_faster(x, self.weight):
            return pointwise_product(x, self.weight.reshape(self.num_output, -1), self.bias)
        if self.bottom_is_im2col:
            columns = self.weight.reshape(self.num_output, -1, 1, 1)
            return F.conv2d(x, columns, self.bias, groups=self.group)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.group)

    def extra_repr(self):
        text = super().extra_repr()
        return text + ", bottom_is_im2col=True" if self.bottom_is_im2col else text


def _batched_product_is_faster(x, weight):
    """Whether a 1x1 convolution of x runs as pointwise_product: standard-layout float CPU
    images. There torch's convolution takes its unfolding path (one thread, one image) or a
    oneDNN 1x1 whose backward is slower: as batched products, forward+backward of a 451 -> 64
    channel 1x1 convolution at 321x321 takes 234 ms instead of 392 ms at one thread, 134 ms
    instead of 320 ms at two (the same or faster for every shape we measured)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and x.dtype == weight.dtype and x.is_contiguous())


def pixel_products(x, weight, bias):
    """(N, O, H*W): weight @ x[n] (+ bias) over the pixels of each image, x (N, C, H, W) and
    weight (O, C). One batched product whose backward is two more (no unfolded copy, no
    zero-filled gradient buffer)."""
    batch, channels, height, width = x.shape
    rows = weight.shape[0]
    images = x.reshape(batch, channels, height * width)
    weights = weight.unsqueeze(0).expand(batch, rows, channels)
    if bias is None:
        return torch.bmm(weights, images)
    return torch.baddbmm(bias.view(1, rows, 1), weights, images)


def pointwise_product(x, weight, bias):
    """pixel_products as (N, O, H, W): a 1x1 convolution of x."""
    return pixel_products(x, weight, bias).view(x.shape[0], weight.shape[0], *x.shape[2:])


@register_layer("Deconvolution")
class Deconvolution(_ConvolutionBase):
    """Transposed convolution: the adjoint of the Convolution with the same geometry. Weight
    (C_in, O/group, kh, kw); output s*(H-1) + d*(k-1)+1 - 2p."""

    @property
    def num_output(self):
        return self.weight.shape[1] * self.group

    @classmethod
    def from_proto(cls, layer_param, ctx):
        kwargs, shape, channels, cp = cls._read_proto(layer_param, ctx)
        if cp.bottom_is_im2col:
            raise ctx.unsupported("convolution_param.bottom_is_im2col is only supported by "
                                  "Convolution")
        layer = cls(weight_shape=(channels, cp.num_output // cp.group, *kwargs["kernel"]), **kwargs)
        layer._check_output_size(shape, ctx)
        layer._fill_blobs(cp, ctx)
        return layer

    def _convolve(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.pad, 0, self.group,
                                  self.dilation)
