"""Helpers shared by the layers: axis canonicalisation and convolution geometry in ``from_proto``,
and the sliding-window settings of the layers that keep them.

The geometry itself (ConvGeometry: kernel / pad / stride / dilation and Caffe's output-size
rules) is the one the kernels use, kernels/geometry.py."""
from segaware_caffe.kernels.geometry import ConvGeometry

__all__ = ["ConvGeometry", "WindowSettings", "canonical_axis", "check_output_not_empty", "conv_geometry",
           "four_axis_bottom", "legacy_shape"]


def canonical_axis(axis, ndim, ctx, field="axis"):
    """Caffe's CanonicalAxisIndex: -ndim <= axis < ndim, negative counts from the end."""
    if not -ndim <= axis < ndim:
        raise ctx.error(f"{field} {axis} is out of range for a {ndim}-D bottom (expected {-ndim}..{ndim - 1})")
    return axis % ndim if ndim else 0


def four_axis_bottom(ctx):
    """Bottom 0's shape, refused unless it has 4 axes (N, C, H, W)."""
    shape = tuple(ctx.bottom_shapes[0])
    if len(shape) != 4:
        raise ctx.error(f"the bottom must have 4 axes (N, C, H, W), got shape {shape}")
    return shape


def legacy_shape(shape, ctx, what="the bottom"):
    """Caffe's legacy (num, channels, height, width) of a blob of at most 4 axes: missing
    trailing axes count as 1. Layers written against that API abort on blobs of more axes."""
    shape = tuple(shape)
    if len(shape) > 4:
        raise ctx.error(f"{what} must have at most 4 axes (num, channels, height, width), got "
                        f"shape {shape}")
    return shape + (1,) * (4 - len(shape))


def _pair(ctx, values, h_field, w_field, cp, name, default):
    has_hw = cp.HasField(h_field) or cp.HasField(w_field)
    if has_hw:
        if len(values):
            raise ctx.error(f"convolution_param: give either {name} or {h_field}/{w_field}, not both")
        if not (cp.HasField(h_field) and cp.HasField(w_field)) and name == "kernel_size":
            raise ctx.error(f"convolution_param: {h_field} and {w_field} must be given together")
        return (int(getattr(cp, h_field)), int(getattr(cp, w_field)))
    if len(values) == 0:
        if default is None:
            raise ctx.error(f"convolution_param.{name} is required (or {h_field} and {w_field})")
        return (default, default)
    if len(values) == 1:
        return (int(values[0]), int(values[0]))
    if len(values) == 2:
        return (int(values[0]), int(values[1]))
    raise ctx.error(f"convolution_param.{name} has {len(values)} values; expected 1 or 2 for a 2-D layer")


def conv_geometry(cp, ctx):
    """Kernel/pad/stride/dilation of a ConvolutionParameter with Caffe's defaults (pad 0,
    stride 1, dilation 1; kernel required)."""
    kernel = _pair(ctx, cp.kernel_size, "kernel_h", "kernel_w", cp, "kernel_size", None)
    pad = _pair(ctx, cp.pad, "pad_h", "pad_w", cp, "pad", 0)
    stride = _pair(ctx, cp.stride, "stride_h", "stride_w", cp, "stride", 1)
    if len(cp.dilation) > 2:
        raise ctx.error(f"convolution_param.dilation has {len(cp.dilation)} values; expected 1 or 2")
    dilation = ((1, 1) if not len(cp.dilation) else
                (int(cp.dilation[0]), int(cp.dilation[-1])))
    if min(kernel) <= 0:
        raise ctx.error(f"convolution_param: kernel size must be > 0, got {kernel}")
    if min(stride) <= 0:
        raise ctx.error(f"convolution_param: stride must be > 0, got {stride}")
    if min(dilation) <= 0:
        raise ctx.error(f"convolution_param: dilation must be > 0, got {dilation}")
    return ConvGeometry(kernel, pad, stride, dilation)



def check_output_not_empty(geometry, spatial_size, ctx):
    """Refuse a bottom of `spatial_size` (h, w) whose output by `geometry` has no pixel."""
    out = geometry.output_size(*spatial_size)
    if min(out) <= 0:
        raise ctx.error(f"the bottom's spatial size {tuple(spatial_size)} gives an empty output "
                        f"{out} (kernel {geometry.kernel}, pad {geometry.pad}, dilation "
                        f"{geometry.dilation})")

class WindowSettings:
    """Mixin of the layers with a sliding window: kernel, pad, stride and dilation as (h, w)
    tuples of plain ints, and their ConvGeometry."""

    def _set_window(self, kernel, pad, stride, dilation):
        self.kernel = tuple(kernel)
        self.pad = tuple(pad)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)

    @property
    def geometry(self):
        return ConvGeometry(self.kernel, self.pad, self.stride, self.dilation)
