"""Interp (DeepLab v2): bilinear resize with align-corners sampling."""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..kernels import _native

from ..layer import CaffeLayer, register_layer
from ..params import four_axis_bottom


@register_layer("Interp")
class Interp(CaffeLayer):
    """Crop by the (non-positive) pad_beg/pad_end, then resize with bilinear align-corners
    interpolation; backward is the transpose (scatter of the four weights).

    Output size: the first matching rule of shrink only, zoom only, height and width, shrink then
    zoom, in that order. The crop offset is -pad_beg for both rows and columns.
    """

    def __init__(self, *, zoom_factor=None, shrink_factor=None, height=None, width=None,
                 pad_beg=0, pad_end=0):
        super().__init__()
        by_size = height is not None or width is not None
        by_factor = zoom_factor is not None or shrink_factor is not None
        if by_size == by_factor or (by_size and (height is None or width is None)):
            raise ValueError("give height and width, or zoom_factor and/or shrink_factor")
        self.zoom_factor = zoom_factor
        self.shrink_factor = shrink_factor
        self.height = height
        self.width = width
        self.pad_beg = pad_beg
        self.pad_end = pad_end

    @classmethod
    def from_proto(cls, layer_param, ctx):
        ip = layer_param.interp_param
        has_zoom, has_shrink = ip.HasField("zoom_factor"), ip.HasField("shrink_factor")
        has_size = ip.HasField("height") and ip.HasField("width")
        if ip.pad_beg > 0 or ip.pad_end > 0:
            raise ctx.error(f"interp_param.pad_beg and pad_end must be <= 0 (they crop), got "
                            f"{ip.pad_beg} and {ip.pad_end}")
        if has_shrink and ip.shrink_factor < 1:
            raise ctx.error(f"interp_param.shrink_factor must be >= 1, got {ip.shrink_factor}")
        if has_zoom and ip.zoom_factor < 1:
            raise ctx.error(f"interp_param.zoom_factor must be >= 1, got {ip.zoom_factor}")
        kwargs = dict(pad_beg=ip.pad_beg, pad_end=ip.pad_end)
        if has_shrink and not has_zoom:
            kwargs.update(shrink_factor=ip.shrink_factor)
        elif has_zoom and not has_shrink:
            kwargs.update(zoom_factor=ip.zoom_factor)
        elif has_size:
            if ip.height <= 0 or ip.width <= 0:
                raise ctx.error(f"interp_param.height and width must be > 0, got {ip.height} "
                                f"and {ip.width}")
            kwargs.update(height=ip.height, width=ip.width)
        elif has_shrink and has_zoom:
            kwargs.update(shrink_factor=ip.shrink_factor, zoom_factor=ip.zoom_factor)
        else:
            raise ctx.error("interp_param needs an output size rule: zoom_factor, shrink_factor "
                            "(or both), or height and width")
        shape = four_axis_bottom(ctx)
        layer = cls(**kwargs)
        in_h, in_w = (size + ip.pad_beg + ip.pad_end for size in shape[2:])
        if in_h <= 0 or in_w <= 0:
            raise ctx.error(f"cropping pad_beg {ip.pad_beg} and pad_end {ip.pad_end} leaves nothing "
                            f"of the {shape[2]}x{shape[3]} bottom")
        return layer

    def output_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        in_h, in_w = (size + self.pad_beg + self.pad_end for size in shape[-2:])
        return [shape[:-2] + tuple(self.output_spatial_size(in_h, in_w))]

    def output_spatial_size(self, in_h, in_w):
        """(Ho, Wo) for an effective (cropped) input size (in_h, in_w)."""
        if self.height is not None:
            return self.height, self.width
        return self._resized(in_h), self._resized(in_w)

    def _resized(self, size):
        if self.shrink_factor is not None:
            size = (size - 1) // self.shrink_factor + 1
        if self.zoom_factor is not None:
            size = size + (size - 1) * (self.zoom_factor - 1)
        return size

    def forward(self, x):
        return self.resize(x)

    def crop_and_size(self, x):
        """(the crop of bottom x that is resized, the top's (height, width))."""
        height, width = x.shape[-2:]
        in_h = height + self.pad_beg + self.pad_end
        in_w = width + self.pad_beg + self.pad_end
        start = -self.pad_beg
        return x[..., start:start + in_h, start:start + in_w], \
            self.output_spatial_size(in_h, in_w)

    def resize(self, x, out=None):
        """The top of bottom x; with `out` (a tensor of the top's shape, in the memory layout
        the caller chose) it is written there instead of into a new tensor."""
        crop, (out_h, out_w) = self.crop_and_size(x)
        start, (in_h, in_w) = -self.pad_beg, crop.shape[-2:]
        if (out_h, out_w) == (in_h, in_w):
            return crop.clone() if out is None else out.copy_(crop)
        if out is None:
            if _CompiledBilinear.applies(x, start, in_h, in_w):
                return _CompiledBilinear.apply(x, start, in_h, in_w, out_h, out_w)
            return F.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=True)
        return torch._C._nn.upsample_bilinear2d(crop, [out_h, out_w], True, None, None, out=out)

    def extra_repr(self):
        names = ("zoom_factor", "shrink_factor", "height", "width")
        parts = [f"{n}={getattr(self, n)}" for n in names if getattr(self, n) is not None]
        parts += [f"{n}={getattr(self, n)}" for n in ("pad_beg", "pad_end") if getattr(self, n)]
        return ", ".join(parts)


class _CompiledBilinear(torch.autograd.Function):
    """The resize of a crop of a standard-layout CPU image and its transpose as compiled loops
    (kernels/cpu/interp.c): the same four pixels and weights as torch's bilinear resize, its
    backward taken one axis at a time (torch's sums in another order); torch's own backward is
    several times slower on the released nets' embedding heads."""

    @staticmethod
    def applies(x, start, in_h, in_w):
        return (x.dim() == 4 and _native.plain(x) and x.is_contiguous()
                and x.dtype in (torch.float32, torch.float64) and x.numel() > 0
                and 0 <= start and start + in_h <= x.shape[2] and start + in_w <= x.shape[3]
                and _native.function("interp.c", "bilinear_backward", x.dtype) is not None)

    @staticmethod
    def forward(ctx, x, start, in_h, in_w, out_h, out_w):
        top = x.new_empty((*x.shape[:2], out_h, out_w))
        crop = x[..., start:start + in_h, start:start + in_w]
        if not bilinear_into(x, crop, top):
            raise RuntimeError("Interp: the compiled resize refused an input it had accepted")
        ctx.geometry = (x.shape, start, in_h, in_w, out_h, out_w)
        return top

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_top):
        shape, start, in_h, in_w, out_h, out_w = ctx.geometry
        grad_top = grad_top.contiguous()
        # the loop zeroes the crop; only a gradient larger than the crop needs zeros around it
        whole = start == 0 and (in_h, in_w) == tuple(shape[2:])
        grad_x = grad_top.new_empty(shape) if whole else grad_top.new_zeros(shape)
        crop = grad_x[..., start:start + in_h, start:start + in_w]
        loop = _native.function("interp.c", "bilinear_backward", grad_top.dtype)
        if loop(_native.threads(), shape[0] * shape[1], grad_top.data_ptr(), crop.data_ptr(),
                in_h, in_w, crop.stride(1), crop.stride(2), out_h, out_w) != 0:
            raise MemoryError("Interp backward: no memory for the compiled transpose's tables")
        return grad_x, None, None, None, None, None


def bilinear_into(x, crop, top, accumulate=False):
    """The resize of `crop` (a crop of the 4-D image x) written into `top` (or added to it,
    `accumulate`) by kernels/cpu/interp.c, x in the standard layout or channels_last and top in
    x's layout; False (nothing written) where that loop does not apply."""
    loop = _native.function("interp.c", "bilinear", x.dtype) if x.dim() == 4 else None
    if loop is None or not _native.plain(x, top) or crop.numel() == 0 or \
            top.dtype != x.dtype or top.shape[:2] != x.shape[:2]:
        return False
    num, channels = x.shape[:2]
    if x.is_contiguous():
        layout, planes, inner, plane_stride = torch.contiguous_format, num * channels, 1, \
            crop.stride(1)
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        layout, planes, inner, plane_stride = torch.channels_last, num, channels, crop.stride(0)
    else:
        return False
    if not top.is_contiguous(memory_format=layout):
        return False
    (in_h, in_w), (out_h, out_w) = crop.shape[-2:], top.shape[-2:]
    if loop(_native.threads(), planes, crop.data_ptr(), top.data_ptr(), inner, in_h, in_w,
            plane_stride, crop.stride(2), crop.stride(3), out_h, out_w, int(accumulate)) != 0:
        raise MemoryError(f"Interp: no memory for the tables of {out_w} columns")
    return True
