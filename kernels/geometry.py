"""Convolution geometry, shared by the kernels and by the layers that read `convolution_param`.

A geometry is the kernel, pad, stride and dilation of a sliding 2-D window, each an (h, w) pair.
Caffe's im2col rules:

    output = floor((size + 2 pad - (dilation (kernel - 1) + 1)) / stride) + 1     (convolution)
    output = stride (size - 1) + dilation (kernel - 1) + 1 - 2 pad               (deconvolution)

and tap k = i * kernel_w + j of output (ho, wo) reads input pixel
(ho stride_h - pad_h + i dilation_h, wo stride_w - pad_w + j dilation_w); pixels outside the
image read as 0. The segmentation-aware layers call the tap (kernel_h div 2, kernel_w div 2) the
patch centre.

This module also holds the strided tap views the CPU paths are built from, the one input check
every op uses, and the autograd wiring the two weighted-tap convolution ops share.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# dtypes the ops accept; float16 / bfloat16 run in float32 internally (see each op)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def as_pair(value, name):
    """An int or a 2-sequence as (h, w) ints."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}") from None
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    return pair


def conv_output_size(size, kernel, pad, stride, dilation):
    """Caffe's convolution output size along one axis (may be <= 0 for a too-small input)."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def deconv_output_size(size, kernel, pad, stride, dilation):
    """Caffe's deconvolution output size along one axis (the inverse of the convolution rule)."""
    return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * pad


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel / pad / stride / dilation of a 2-D sliding window, as (h, w) int pairs.

    `ConvGeometry.of(...)` validates (kernel, stride, dilation >= 1, pad >= 0); the plain
    constructor does not, for callers that reproduce a quirk such as dilation 0.
    """
    kernel: tuple
    pad: tuple = (0, 0)
    stride: tuple = (1, 1)
    dilation: tuple = (1, 1)

    FIELDS = ("kernel", "pad", "stride", "dilation")

    @classmethod
    def of(cls, kernel_size, pad=0, stride=1, dilation=1):
        geometry = cls(as_pair(kernel_size, "kernel_size"), as_pair(pad, "pad"),
                       as_pair(stride, "stride"), as_pair(dilation, "dilation"))
        geometry.validate()
        return geometry

    def validate(self):
        for name, field, rule in (("kernel_size", "kernel", "> 0"), ("pad", "pad", ">= 0"),
                                  ("stride", "stride", "> 0"), ("dilation", "dilation", "> 0")):
            value = getattr(self, field)
            if min(value) < (0 if rule == ">= 0" else 1):
                raise ValueError(f"{name} must be {rule}, got {value}")
        return self

    def as_kwargs(self):
        """kernel=, pad=, stride=, dilation=: the keyword arguments of a windowed layer."""
        return dict(kernel=self.kernel, pad=self.pad, stride=self.stride, dilation=self.dilation)

    # -- as the custom ops carry it: 8 ints (kh, kw, ph, pw, sh, sw, dh, dw)
    def as_list(self):
        return [*self.kernel, *self.pad, *self.stride, *self.dilation]

    @classmethod
    def from_list(cls, values):
        values = [int(v) for v in values]
        if len(values) != 8:
            raise ValueError(f"a geometry list holds 8 ints (kh, kw, ph, pw, sh, sw, dh, dw), got "
                             f"{values}")
        return cls(tuple(values[0:2]), tuple(values[2:4]), tuple(values[4:6]), tuple(values[6:8]))

    @property
    def taps(self):
        return self.kernel[0] * self.kernel[1]

    @property
    def centre_tap(self):
        """(i, j) of the tap the segmentation-aware layers treat as the centre: kh div 2, kw div 2."""
        return (self.kernel[0] // 2, self.kernel[1] // 2)

    @property
    def centre_offset(self):
        """Padded-coordinate offsets (as in tap_offsets) of the centre tap."""
        return (self.centre_tap[0] * self.dilation[0], self.centre_tap[1] * self.dilation[1])

    def output_size(self, height, width):
        """(out_h, out_w) by the convolution rule."""
        return tuple(conv_output_size(size, k, p, s, d) for size, k, p, s, d in zip(
            (height, width), self.kernel, self.pad, self.stride, self.dilation))

    def deconv_output_size(self, height, width):
        """(out_h, out_w) by the deconvolution rule."""
        return tuple(deconv_output_size(size, k, p, s, d) for size, k, p, s, d in zip(
            (height, width), self.kernel, self.pad, self.stride, self.dilation))

    def check_output_size(self, height, width, op=None):
        """The convolution output size; ValueError when it is empty."""
        out_h, out_w = self.output_size(height, width)
        if out_h <= 0 or out_w <= 0:
            prefix = f"{op}: " if op else ""
            raise ValueError(f"{prefix}input {height}x{width} is too small for kernel "
                             f"{self.kernel}, pad {self.pad}, stride {self.stride}, dilation "
                             f"{self.dilation}: output would be {out_h}x{out_w}")
        return out_h, out_w

    def tap_loop_workspace(self, shape, itemsize, copies=1):
        """Bytes the CPU tap loops hold beside their output for an (N, C, H, W) input: `copies`
        zero-padded copies of it, two tap temporaries of C channels at the output size, and the
        (kh, kw, Ho, Wo) in-image masks. What the memory budget checks before a pass."""
        n, c, h, w = (int(d) for d in shape)
        out_h, out_w = (max(0, d) for d in self.output_size(h, w))
        padded = n * c * (h + 2 * self.pad[0]) * (w + 2 * self.pad[1]) * itemsize
        return copies * padded + 2 * n * c * out_h * out_w * itemsize + self.taps * out_h * out_w

    def describe(self):
        return (f"kernel {self.kernel}, pad {self.pad}, stride {self.stride}, dilation "
                f"{self.dilation}")


# ---------------------------------------------------------------------------------------------
# the one input check

def check_tensor(op, name, tensor, *, dim=None, dtypes=FLOAT_DTYPES, like=None, same_dtype=False,
                 shape=None):
    """Raise TypeError / ValueError, naming the op and the argument with what was expected and
    what was given, unless `tensor` is a tensor of `dim` dimensions and one of `dtypes`, on
    `like`'s device (and of its dtype with same_dtype), of `shape` (None entries: any size)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(tensor).__name__}")
    if dim is not None and tensor.dim() != dim:
        layout = {4: " (N, C, H, W)"}.get(dim, "")
        raise ValueError(f"{op}: {name} must be {dim}-D{layout}, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of {names}, got {tensor.dtype}")
    if like is not None:
        if tensor.device != like.device:
            raise ValueError(f"{op}: {name} must be on {like.device} like the first input, got "
                             f"{tensor.device}")
        if same_dtype and tensor.dtype != like.dtype:
            raise ValueError(f"{op}: {name} must be {like.dtype} like the first input, got "
                             f"{tensor.dtype}")
    if shape is not None:
        got = tuple(tensor.shape)
        if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
            expected = ("(" + ", ".join("*" if e is None else str(e) for e in shape)
                        + ("," if len(shape) == 1 else "") + ")")
            raise ValueError(f"{op}: {name} must have shape {expected}, got {got}")
    return tensor


def no_autocast(function):
    """Run `function` (an op's implementation) with autocast off: the torch products inside an
    op compute in the dtypes the op chose, not in the autocast dtype."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args, **kwargs)
    return wrapper


def compute_dtype(dtype):
    """The dtype an op computes in for inputs of `dtype`: float32 for the half types."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def register_tap_conv_autograd(op, backward_op):
    """Autograd for a convolution op(x, taps, weight, bias, geometry, group) whose taps tensor
    (mask or attention) weights every tap: backward_op(grad_out, x, taps, weight, geometry, group,
    needs) returns (grad_x, grad_taps, grad_weight, grad_bias), computing only those in `needs`."""
    def setup_context(ctx, inputs, output):
        x, taps, weight, bias, geometry, group = inputs
        ctx.save_for_backward(x, taps, weight)
        ctx.geometry, ctx.group, ctx.has_bias = geometry, group, bias is not None

    def backward(ctx, grad_out):
        x, taps, weight = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                 bool(ctx.needs_input_grad[2]), bool(ctx.has_bias and ctx.needs_input_grad[3])]
        if not any(needs):
            return None, None, None, None, None, None
        grads = backward_op(grad_out, x, taps, weight, ctx.geometry, ctx.group, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None)

    op.register_autograd(backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------
# strided tap views (the CPU paths: one vectorised op per tap)

def tap_offsets(geometry):
    """[(i, j, offset_h, offset_w)] in tap order k = i*kw + j; offsets are in padded coordinates
    (pixel row of tap i at output row ho is ho*stride_h + offset_h - pad_h)."""
    kh, kw = geometry.kernel
    dh, dw = geometry.dilation
    return [(i, j, i * dh, j * dw) for i in range(kh) for j in range(kw)]


def inside_range(out_start, out_end, size, pad, stride, offset):
    """Output positions [lo, hi) of [out_start, out_end) along one axis whose tap at padded
    offset `offset` reads a pixel inside [0, size) (pixel = o * stride + offset - pad), and the
    pixel the first of them reads. Empty (lo >= hi) when none does."""
    lo = max(out_start, -((offset - pad) // stride))      # ceil((pad - offset) / stride)
    hi = min(out_end, (size - 1 + pad - offset) // stride + 1)
    return lo, hi, lo * stride + offset - pad


def axis_inside(size, out_size, kernel, pad, stride, dilation, device):
    """Bool (kernel, out_size): tap row i at output row o lies inside [0, size)."""
    position = (torch.arange(out_size, device=device)[None, :] * stride - pad
                + torch.arange(kernel, device=device)[:, None] * dilation)
    return (position >= 0) & (position < size)


def tap_inside(geometry, height, width, device):
    """Bool (kh, kw, Ho, Wo): tap (i, j) of output (ho, wo) lies inside the H x W image
    (tap_inside[centre_tap] says where the patch centre is inside)."""
    out_h, out_w = geometry.output_size(height, width)
    rows = axis_inside(height, out_h, geometry.kernel[0], geometry.pad[0], geometry.stride[0],
                       geometry.dilation[0], device)
    cols = axis_inside(width, out_w, geometry.kernel[1], geometry.pad[1], geometry.stride[1],
                       geometry.dilation[1], device)
    return rows[:, None, :, None] & cols[None, :, None, :]


def pad_input(x, geometry):
    """Zero-pad the two spatial dims by the geometry's pad (every tap view then stays in range)."""
    pad_h, pad_w = geometry.pad
    return F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x


def unpad(padded, geometry, height, width):
    """The H x W image inside a tensor padded by pad_input."""
    pad_h, pad_w = geometry.pad
    return padded[..., pad_h:pad_h + height, pad_w:pad_w + width]


def patch_view(padded, offset_h, offset_w, out_size, stride):
    """Strided view of a padded (..., Hp, Wp) tensor: element (ho, wo) is the pixel at padded
    (ho*stride_h + offset_h, wo*stride_w + offset_w)."""
    out_h, out_w = out_size
    stride_h, stride_w = stride
    return padded[..., offset_h:offset_h + (out_h - 1) * stride_h + 1:stride_h,
                  offset_w:offset_w + (out_w - 1) * stride_w + 1:stride_w]


def tap_view(padded, geometry, k, out_size):
    """patch_view of tap k."""
    i, j = divmod(k, geometry.kernel[1])
    return patch_view(padded, i * geometry.dilation[0], j * geometry.dilation[1], out_size,
                      geometry.stride)
