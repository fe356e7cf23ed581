"""Pooling MAX / AVE with Caffe's ceil rule and border divisors.

Caffe's output size is computed here and the input is padded (or cropped) to exactly the extent the
windows cover, so torch's own ceil_mode rule never decides a size.
"""
import torch
import torch.nn.functional as F

from ..layer import CaffeLayer, register_layer

FLT_MAX = 3.4028234663852886e38
MAX, AVE, STOCHASTIC = 0, 1, 2
CEIL, FLOOR = 0, 1


def pooled_size(size, kernel, pad, stride, round_mode=CEIL, padded=None):
    """Caffe's pooled size: ceil (or floor) of (size + 2*pad - kernel)/stride, plus one; if the
    layer pads at all (`padded`, either axis; default: this axis), a last window starting at or
    beyond size + pad is dropped."""
    span = size + 2 * pad - kernel
    steps = -((-span) // stride) if round_mode == CEIL else span // stride
    out = steps + 1
    if (pad if padded is None else padded) and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pair(pp, ctx, field, prefix, default):
    """`field` or `prefix_h`+`prefix_w` of a PoolingParameter (Caffe: one form or the other)."""
    h_field, w_field = f"{prefix}_h", f"{prefix}_w"
    has_h, has_w = pp.HasField(h_field), pp.HasField(w_field)
    if has_h or has_w:
        if pp.HasField(field):
            raise ctx.error(f"pooling_param: give either {field} or {h_field} and {w_field}, not both")
        if not (has_h and has_w):
            raise ctx.error(f"pooling_param: {h_field} and {w_field} must be given together")
        return (getattr(pp, h_field), getattr(pp, w_field))
    if pp.HasField(field) or default is None:
        value = getattr(pp, field)
        return (value, value)
    return (default, default)


@register_layer("Pooling")
class Pooling(CaffeLayer):
    """MAX: maximum over the window clipped to the image (first element wins ties; an optional
    second top holds the winner's index h*W + w as float, -1 for none). AVE: sum over the in-image
    part of the window divided by the window size clipped to [-pad, H+pad). Windows start at
    o*stride - pad. With global_pooling the kernel is the bottom's spatial size."""
    TOPS = (1, 2)

    def __init__(self, *, method="MAX", kernel=None, pad=(0, 0), stride=(1, 1),
                 global_pooling=False, round_mode=CEIL, mask_top=False):
        super().__init__()
        if mask_top and method != "MAX":
            raise ValueError("only MAX pooling has a mask top")
        if method not in ("MAX", "AVE"):
            raise ValueError(f"method must be 'MAX' or 'AVE', got {method!r}")
        self.method = method
        self.kernel = None if global_pooling else tuple(kernel)
        self.pad = tuple(pad)
        self.stride = tuple(stride)
        self.global_pooling = global_pooling
        self.round_mode = round_mode
        self.mask_top = mask_top

    @classmethod
    def from_proto(cls, layer_param, ctx):
        pp = layer_param.pooling_param
        if pp.pool == STOCHASTIC:
            raise NotImplementedError(f"{ctx.name} ({ctx.type}): STOCHASTIC pooling is not "
                                      "supported (the original has no CPU forward for it)")
        method = "MAX" if pp.pool == MAX else "AVE"
        if method == "AVE" and len(ctx.top_names) > 1:
            raise ctx.error(f"AVE pooling has one top, got {len(ctx.top_names)}")
        shape = tuple(ctx.bottom_shapes[0])
        if len(shape) != 4:
            raise ctx.error(f"the bottom must have 4 axes (N, C, H, W), got shape {shape}")
        pad = _pair(pp, ctx, "pad", "pad", 0)
        stride = _pair(pp, ctx, "stride", "stride", 1)
        if pp.global_pooling:
            if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
                raise ctx.error("with global_pooling the kernel size must not be given")
            if pad != (0, 0) or stride != (1, 1):
                raise ctx.error(f"with global_pooling pad must be 0 and stride 1, got pad {pad} "
                                f"and stride {stride}")
            kernel = None
        else:
            if not (pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w")):
                raise ctx.error("pooling_param.kernel_size (or kernel_h and kernel_w) is required")
            kernel = _pair(pp, ctx, "kernel_size", "kernel", None)
            if min(kernel) <= 0:
                raise ctx.error(f"pooling_param: kernel size must be > 0, got {kernel}")
            if min(stride) <= 0:
                raise ctx.error(f"pooling_param: stride must be > 0, got {stride}")
            if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
                raise ctx.error(f"pooling_param: pad {pad} must be smaller than the kernel {kernel}")
        layer = cls(method=method, kernel=kernel, pad=pad, stride=stride,
                    global_pooling=pp.global_pooling, round_mode=pp.round_mode,
                    mask_top=len(ctx.top_names) == 2)
        out = layer.output_spatial_size(*shape[2:])
        if min(out) <= 0:
            raise ctx.error(f"the bottom's spatial size {shape[2:]} gives an empty output {out} "
                            f"(kernel {kernel}, pad {pad}, stride {stride})")
        return layer

    def _kernel_for(self, height, width):
        return (height, width) if self.global_pooling else self.kernel

    def output_spatial_size(self, height, width):
        kernel = self._kernel_for(height, width)
        padded = any(self.pad)
        return tuple(pooled_size(size, k, p, s, self.round_mode, padded)
                     for size, k, p, s in zip((height, width), kernel, self.pad, self.stride))

    def forward(self, x):
        height, width = x.shape[-2:]
        kernel = self._kernel_for(height, width)
        out_h, out_w = self.output_spatial_size(height, width)
        pad_h, pad_w = self.pad
        # The padded extent is exactly what the windows cover: pad before, and after the input
        # whatever the last window needs (a negative amount crops rows no window reads).
        after_h = (out_h - 1) * self.stride[0] + kernel[0] - height - pad_h
        after_w = (out_w - 1) * self.stride[1] + kernel[1] - width - pad_w
        borders = (pad_w, after_w, pad_h, after_h)
        if self.method == "MAX":
            # -FLT_MAX is Caffe's initial maximum: padding never beats an in-image value and an
            # empty window gives -FLT_MAX, as in Caffe.
            padded = F.pad(x, borders, value=-FLT_MAX)
            top, index = F.max_pool2d(padded, kernel, self.stride, return_indices=True)
            if self.mask_top:
                return top, self._mask(index, padded.shape[-1], height, width).to(x.dtype)
            return top
        padded = F.pad(x, borders)
        sums = F.avg_pool2d(padded, kernel, self.stride, divisor_override=1)
        return sums / self._divisor(out_h, out_w, height, width, kernel, x)

    def _mask(self, index, padded_width, height, width):
        with torch.no_grad():
            row = index // padded_width - self.pad[0]
            col = index % padded_width - self.pad[1]
            inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
            return torch.where(inside, row * width + col, -1)

    def _divisor(self, out_h, out_w, height, width, kernel, like):
        """AVE divisor per output: the window clipped to [-pad, size+pad) (padding counted)."""
        sizes = []
        for out, size, k, p, s in zip((out_h, out_w), (height, width), kernel, self.pad, self.stride):
            start = torch.arange(out, device=like.device) * s - p
            end = torch.clamp(start + k, max=size + p)
            sizes.append((end - start).to(like.dtype))
        return sizes[0][:, None] * sizes[1][None, :]

    def extra_repr(self):
        if self.global_pooling:
            return f"method={self.method}, global_pooling=True"
        text = f"method={self.method}, kernel={self.kernel}, stride={self.stride}"
        if self.pad != (0, 0):
            text += f", pad={self.pad}"
        if self.round_mode == FLOOR:
            text += ", round_mode=FLOOR"
        if self.mask_top:
            text += ", mask_top=True"
        return text
