"""Pooling MAX / AVE with Caffe's ceil rule and border divisors, and STOCHASTIC as the original's
GPU code computes it (its CPU code has none).

Caffe's output size is computed here and the input is padded (or cropped) to exactly the extent the
windows cover, so torch's own ceil_mode rule never decides a size.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..kernels import _native
from ..layer import CaffeLayer, register_layer
from ..params import four_axis_bottom

FLT_MAX = 3.4028234663852886e38
FLT_MIN = 1.1754943508222875e-38
_METHODS = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}   # PoolingParameter.PoolMethod
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



def _after(out, size, kernel, pad, stride):
    """Padding needed after the input so that `out` windows fit exactly (negative: crop)."""
    return (out - 1) * stride + kernel - size - pad


class _CompiledMaxPool(torch.autograd.Function):
    """MAX pooling of a standard-layout CPU image with its winners' positions, and its backward,
    as compiled loops (kernels/cpu/pooling.c): bit for bit the torch path below (the same scan
    of each window over the input as padded with -FLT_MAX, the gradient accumulated in the same
    order), without the padded copy, its gradient or the index conversion."""

    @staticmethod
    def applies(x):
        return (x.dim() == 4 and _native.plain(x) and x.is_contiguous() and x.numel() > 0
                and x.dtype in (torch.float32, torch.float64)
                and _native.function("pooling.c", "max_pool_indices", x.dtype) is not None
                and _native.function("pooling.c", "max_pool_indices_backward", x.dtype)
                is not None)

    @staticmethod
    def forward(ctx, x, kernel, pad, stride, out_hw):
        num, channels, height, width = x.shape
        top = x.new_empty((num, channels, *out_hw))
        index = torch.empty(top.shape, dtype=torch.int64)
        loop = _native.function("pooling.c", "max_pool_indices", x.dtype)
        if loop(_native.threads(), num * channels, x.data_ptr(), top.data_ptr(),
                index.data_ptr(), height, width, *out_hw, *kernel, *pad, *stride) != 0:
            raise MemoryError("Pooling: no memory for the compiled loop's row buffer")
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return top, index

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_top, _):
        (index,) = ctx.saved_tensors
        num, channels, height, width = ctx.input_shape
        grad_top = grad_top.contiguous()
        grad_x = grad_top.new_empty(ctx.input_shape)
        loop = _native.function("pooling.c", "max_pool_indices_backward", grad_top.dtype)
        loop(_native.threads(), num * channels, grad_top.data_ptr(), index.data_ptr(),
             grad_x.data_ptr(), height, width, *index.shape[2:])
        return grad_x, None, None, None, None


def pool2d(x, method, kernel, pad, stride, out_hw, mask_top=False):
    """MAX or AVE pooling of (N, C, H, W) with Caffe's windows: window o covers
    [o*stride - pad, o*stride - pad + kernel); MAX takes the maximum over its in-image part
    (padding never wins), AVE sums the in-image part and divides by the window clipped to
    [-pad, size + pad). Returns the top, and with mask_top the winner's h*W + w (-1 for none)."""
    height, width = x.shape[-2:]
    out_h, out_w = out_hw
    borders = (pad[1], _after(out_w, width, kernel[1], pad[1], stride[1]),
               pad[0], _after(out_h, height, kernel[0], pad[0], stride[0]))
    if method == "MAX":
        if _CompiledMaxPool.applies(x):
            top, index = _CompiledMaxPool.apply(x, kernel, pad, stride, out_hw)
            return (top, index.to(x.dtype)) if mask_top else top
        # -FLT_MAX is Caffe's initial maximum: padding never beats an in-image value and an
        # empty window gives -FLT_MAX, as in Caffe.
        padded = F.pad(x, borders, value=-FLT_MAX)
        top, index = F.max_pool2d(padded, kernel, stride, return_indices=True)
        if mask_top:
            with torch.no_grad():
                row = index // padded.shape[-1] - pad[0]
                col = index % padded.shape[-1] - pad[1]
                inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
                mask = torch.where(inside, row * width + col, -1).to(x.dtype)
            return top, mask
        return top
    sums = F.avg_pool2d(F.pad(x, borders), kernel, stride, divisor_override=1)
    sizes = []
    for out, size, k, p, s in zip((out_h, out_w), (height, width), kernel, pad, stride):
        start = torch.arange(out, device=x.device) * s - p
        end = torch.clamp(start + k, max=size + p)
        sizes.append((end - start).to(x.dtype))
    return sums / (sizes[0][:, None] * sizes[1][None, :])


def _window_taps(x, kernel, stride, out_hw):
    """The taps of every (unpadded) window: values (N*C, kh*kw, L) in row-major tap order, zero
    where a window runs past the image, with each tap's flat position h*W + w and whether it is
    inside the image (both (kh*kw, L)); L = Ho*Wo."""
    num, channels, height, width = x.shape
    (kh, kw), (sh, sw), (out_h, out_w) = kernel, stride, out_hw
    borders = (0, _after(out_w, width, kw, 0, sw), 0, _after(out_h, height, kh, 0, sh))
    padded = F.pad(x, borders).reshape(num * channels, 1, *[n + b for n, b in zip(
        (height, width), (borders[3], borders[1]))])
    taps = F.unfold(padded, kernel, stride=stride)
    device = x.device
    rows = (torch.arange(out_h, device=device) * sh)[None, :, None] + \
        torch.arange(kh, device=device).repeat_interleave(kw)[:, None, None]
    cols = (torch.arange(out_w, device=device) * sw)[None, None, :] + \
        torch.arange(kw, device=device).repeat(kh)[:, None, None]
    inside = ((rows < height) & (cols < width)).reshape(kh * kw, -1)
    position = (rows.clamp(max=height - 1) * width + cols.clamp(max=width - 1)).reshape(kh * kw, -1)
    return taps, position, inside


def stochastic_pool_train(x, kernel, stride, out_hw, generator=None):
    """TRAIN-phase STOCHASTIC pooling as the original's GPU kernel: per window a uniform u in
    (0, 1] (curand's range), threshold u * sum(window), and the output is the first element in
    row-major order at which the running sum reaches the threshold; its gradient goes to that
    element. u is drawn from torch's generator on x's device (`generator`, else the default one,
    seeded by torch.manual_seed): Caffe's random stream itself cannot be reproduced. A window whose
    running sum never reaches the threshold (negative inputs; the original leaves its output
    unwritten) outputs 0 with no gradient."""
    num, channels, height, width = x.shape
    taps, position, inside = _window_taps(x, kernel, stride, out_hw)
    with torch.no_grad():
        running = taps.cumsum(1)
        u = 1 - torch.rand((taps.shape[0], 1, taps.shape[2]), generator=generator,
                           device=x.device, dtype=x.dtype)
        hit = (running >= u * running[:, -1:]) & inside
        found = hit.any(1)
        first = hit.to(torch.uint8).argmax(1, keepdim=True)
        chosen = position.expand(taps.shape[0], -1, -1).gather(1, first).squeeze(1)
    picked = x.reshape(num * channels, height * width).gather(1, chosen)
    top = torch.where(found, picked, torch.zeros_like(picked))
    return top.reshape(num, channels, *out_hw)


def stochastic_pool_test(x, kernel, stride, out_hw):
    """TEST-phase STOCHASTIC pooling (GPU code): sum(x^2) / (FLT_MIN + sum(x)) over each window
    clipped to the image, i.e. the activations weighted by themselves."""
    borders = (0, _after(out_hw[1], x.shape[-1], kernel[1], 0, stride[1]),
               0, _after(out_hw[0], x.shape[-2], kernel[0], 0, stride[0]))
    padded = F.pad(x, borders)
    sums = F.avg_pool2d(padded, kernel, stride, divisor_override=1)
    squares = F.avg_pool2d(padded * padded, kernel, stride, divisor_override=1)
    return squares / (sums + FLT_MIN)


@register_layer("Pooling")
class Pooling(CaffeLayer):
    """MAX: maximum over the window clipped to the image (first element wins ties; an optional
    second top holds the winner's index h*W + w as float, -1 for none). AVE: sum over the in-image
    part of the window divided by the window size clipped to [-pad, H+pad). Windows start at
    o*stride - pad. With global_pooling the kernel is the bottom's spatial size.

    STOCHASTIC (no padding; the original has only GPU code for it, which this follows): in TRAIN
    each window outputs one of its elements drawn with probability proportional to its value
    (see stochastic_pool_train; the gradient goes to the drawn element), in TEST
    sum(x^2) / sum(x). The TEST phase has no backward: the original's would route gradients by
    indices that only a TRAIN forward writes."""
    TOPS = (1, 2)

    def __init__(self, *, method="MAX", kernel=None, pad=(0, 0), stride=(1, 1),
                 global_pooling=False, round_mode=CEIL, mask_top=False, train=False):
        super().__init__()
        if mask_top and method != "MAX":
            raise ValueError("only MAX pooling has a mask top")
        if method not in ("MAX", "AVE", "STOCHASTIC"):
            raise ValueError(f"method must be 'MAX', 'AVE' or 'STOCHASTIC', got {method!r}")
        if method == "STOCHASTIC" and tuple(pad) != (0, 0):
            raise ValueError(f"STOCHASTIC pooling takes no padding, got pad {tuple(pad)}")
        self.method = method
        self.kernel = None if global_pooling else tuple(kernel)
        self.pad = tuple(pad)
        self.stride = tuple(stride)
        self.global_pooling = global_pooling
        self.round_mode = round_mode
        self.mask_top = mask_top
        self.train_phase = train

    @classmethod
    def from_proto(cls, layer_param, ctx):
        pp = layer_param.pooling_param
        method = _METHODS.get(pp.pool)
        if method is None:
            raise ctx.error(f"pooling_param.pool must be MAX, AVE or STOCHASTIC, got {pp.pool}")
        if method != "MAX" and len(ctx.top_names) > 1:
            raise ctx.error(f"{method} pooling has one top, got {len(ctx.top_names)}")
        shape = four_axis_bottom(ctx)
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
        if method == "STOCHASTIC" and pad != (0, 0):
            raise ctx.error(f"pooling_param: padding is implemented only for MAX and AVE pooling, "
                            f"got pad {pad} with STOCHASTIC")
        layer = cls(method=method, kernel=kernel, pad=pad, stride=stride,
                    global_pooling=pp.global_pooling, round_mode=pp.round_mode,
                    mask_top=len(ctx.top_names) == 2, train=ctx.phase == "TRAIN")
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

    def output_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        top = shape[:-2] + tuple(self.output_spatial_size(*shape[-2:]))
        return [top, top] if self.mask_top else [top]

    def forward(self, x):
        kernel = self._kernel_for(*x.shape[-2:])
        out = self.output_spatial_size(*x.shape[-2:])
        if self.method != "STOCHASTIC":
            return pool2d(x, self.method, kernel, self.pad, self.stride, out, self.mask_top)
        if self.train_phase:
            return stochastic_pool_train(x, kernel, self.stride, out)
        with torch.no_grad():
            return stochastic_pool_test(x, kernel, self.stride, out)

    def has_backward(self):
        # TEST-phase STOCHASTIC pooling samples no position, and the original's Backward reads
        # the positions a TRAIN-phase forward samples: the TEST phase has no backward
        return not (self.method == "STOCHASTIC" and not self.train_phase)

    def forward_workspace(self, bottom_shapes, top_shapes, itemsize):
        # the bottom padded to exactly the windows' extent, the winners' int64 indices (MAX), the
        # running sums and draws (STOCHASTIC, kh*kw taps per window)
        n, c, height, width = bottom_shapes[0]
        kernel = self._kernel_for(height, width)
        out_h, out_w = self.output_spatial_size(height, width)
        extent = [(o - 1) * s + k for o, s, k in zip((out_h, out_w), self.stride, kernel)]
        padded = n * c * max(extent[0], height) * max(extent[1], width) * itemsize
        windows = n * c * max(0, out_h) * max(0, out_w)
        if self.method == "STOCHASTIC":
            return padded + 3 * windows * kernel[0] * kernel[1] * itemsize
        return padded + windows * (8 + 8 * self.mask_top)

    def extra_repr(self):
        phase = (", phase=" + ("TRAIN" if self.train_phase else "TEST")) if self.method == "STOCHASTIC" else ""
        if self.global_pooling:
            return f"method={self.method}, global_pooling=True{phase}"
        text = f"method={self.method}, kernel={self.kernel}, stride={self.stride}"
        if self.pad != (0, 0):
            text += f", pad={self.pad}"
        if self.round_mode == FLOOR:
            text += ", round_mode=FLOOR"
        if self.mask_top:
            text += ", mask_top=True"
        return text + phase
