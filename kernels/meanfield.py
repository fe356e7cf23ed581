"""NormConvMeanfield: the segmentation-aware CRF of the released ResNet models.

    A_b = softmax_k(-scale_b * im2dist_L2(F_b))      A_s likewise from F_s (computed once)
    X_0 = q0
    for t in 0..T-1:
        Q = softmax over channels of X_t
        B[c, p] = sum_k A_b[k, p] * Q[c, p + offset_k]      (bilateral message, zero outside)
        S[c, p] = sum_k A_s[k, p] * Q[c, p + offset_k]      (spatial message)
        X_{t+1} = U - compat · (W_s · S + W_b · B)          (C x C matrices, per pixel)
    return X_T                                               (log domain, not normalised)

The messages are the original's internal NormConv layers (depthwise, all-ones weights, no bias):
the op `torch.ops.segaware.crf_message` computes them tap by tap without a column matrix, and
gives the exact gradient to Q and to the attention. Everything else is composed of autograd-aware torch ops (exact, and
each iteration keeps only a few (N, C, H, W) tensors for backward). Because the attention depends
only on the features, it is computed once and its gradient accumulates over the iterations.

Quirks of the original, kept:
* dilation 0 (the original's default): every tap samples the patch centre, so the message is the
  zero-padded Q itself (the softmax weights sum to one over one value) on an (H+2p) x (W+2p) grid,
  and the features get no gradient (the original's is rounding noise: A * (G - sum_k A*G) with
  every G_k equal);
* a message grid larger than H x W is read as the original's C x C products read it: the first
  C*H*W values of each image's buffer, reinterpreted as (C, H, W). A smaller grid is an error (the
  original would read past its buffer).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _cuda, _native
from .geometry import (ConvGeometry, HALF_DTYPES, check_tensor, no_autocast, pad_input, patch_view,
                       tap_view, unpad)
from .im2dist import im2dist


@dataclass(frozen=True)
class MessageSpec:
    """One of the CRF's two message convolutions (square kernels, as in the original)."""
    kernel: int
    pad: int = 0
    stride: int = 1
    dilation: int = 1           # 0 = the original's default: every tap samples the centre
    scale: float = 0.0          # attention = softmax(-scale * D)
    remove_center: bool = True
    remove_bounds: bool = True

    @property
    def geometry(self):
        # built directly: ConvGeometry.of would reject the original's dilation 0
        return ConvGeometry((self.kernel,) * 2, (self.pad,) * 2, (self.stride,) * 2,
                            (self.dilation,) * 2)

    def validate(self, what):
        if self.kernel < 1 or self.stride < 1 or self.pad < 0 or self.dilation < 0:
            raise ValueError(f"normconv_meanfield: {what} needs kernel >= 1, stride >= 1, pad >= 0 "
                             f"and dilation >= 0, got {self}")


# ------------------------------------------------------------------------------------------ CPU
# bytes of one band of message rows: every tap is added into a band while it stays in a core's
# L2 cache (the 169-tap bilateral message of the res net at 257x257, one core: 63 ms, against
# 89 ms for whole planes, which stream the message from memory once per tap)
CPU_BAND_BYTES = 512 << 10


def _message_forward_native(padded, attention, geometry, out):
    """The message as one compiled loop (kernels/cpu/meanfield.c), the torch loop's result bit
    for bit; False where there is none."""
    loop = _native.function("meanfield.c", "message_forward", padded.dtype)
    if loop is None or attention.dtype != padded.dtype or not attention.is_contiguous() or \
            not _native.plain(padded, attention, out):
        return False
    batch, channels, padded_h, padded_w = padded.shape
    out_h, out_w = out.shape[-2:]
    (kh, kw), stride, dilation = geometry.kernel, geometry.stride, geometry.dilation
    # every tap's pixels must lie in the padded grid (the torch views would fail otherwise)
    if (out_h - 1) * stride[0] + (kh - 1) * dilation[0] >= padded_h or \
            (out_w - 1) * stride[1] + (kw - 1) * dilation[1] >= padded_w:
        return False
    threads = _native.threads()
    rows = max(1, CPU_BAND_BYTES // max(1, channels * out_w * padded.element_size()))
    rows = max(1, min(rows, -(-out_h // (4 * threads))))     # a few bands per thread
    bands = -(-out_h // rows)
    loop(threads, batch * bands, padded.data_ptr(), attention.data_ptr(), out.data_ptr(),
         channels, padded_h, padded_w, out_h, out_w, kh, kw, *stride, *dilation, rows)
    return True


def _message_forward_cpu(q, attention, geometry):
    batch, channels = q.shape[:2]
    out_h, out_w = out_size = tuple(attention.shape[-2:])
    padded = pad_input(q, geometry)
    if q.dtype in (torch.float32, torch.float64) and batch * channels * out_h * out_w:
        out = q.new_empty(batch, channels, *out_size)
        if _message_forward_native(padded.contiguous(), attention, geometry, out):
            return out
    out = q.new_zeros(batch, channels, *out_size)
    rows = max(1, CPU_BAND_BYTES // max(1, batch * channels * out_w * q.element_size()))
    kw = geometry.kernel[1]
    (stride_h, _), (dil_h, dil_w) = geometry.stride, geometry.dilation
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band = out[:, :, row_start:row_end]
        for k in range(geometry.taps):
            i, j = divmod(k, kw)
            pixels = patch_view(padded, row_start * stride_h + i * dil_h, j * dil_w,
                                (row_end - row_start, out_w), geometry.stride)
            band.addcmul_(pixels, attention[:, k:k + 1, row_start:row_end])
    return out


def _message_backward_cpu(grad_out, q, attention, geometry, needs):
    need_q, need_attention = needs
    height, width = q.shape[-2:]
    out_size = tuple(attention.shape[-2:])
    padded = pad_input(q, geometry)
    grad_padded = torch.zeros_like(padded) if need_q else None
    grad_attention = torch.empty_like(attention) if need_attention else None
    for k in range(geometry.taps):
        if need_q:
            tap_view(grad_padded, geometry, k, out_size).addcmul_(grad_out, attention[:, k:k + 1])
        if need_attention:
            # channel dot product per pixel (einsum beats mul-then-sum by about a third here)
            grad_attention[:, k] = torch.einsum("nchw,nchw->nhw",
                                                tap_view(padded, geometry, k, out_size), grad_out)
    grad_q = unpad(grad_padded, geometry, height, width).contiguous() if need_q else None
    return grad_q, grad_attention


# ----------------------------------------------------------------------------------------- CUDA
# kernels/cuda/meanfield.cu: same decomposition as the CPU helpers, gathers only
_SOURCE = ("meanfield.cu",)


def _sizes(q, attention, geometry):
    return _cuda.geometry_args(geometry, q.shape[1], q.shape[2], q.shape[3], attention.shape[-2:])


def _message_forward_cuda(q, attention, geometry, images=0):
    batch, channels = q.shape[:2]
    out = q.new_empty(batch, channels, *attention.shape[-2:])
    _cuda.launch_rows("message_forward", _SOURCE, batch * channels,
                      attention.shape[2] * attention.shape[3],
                      (_cuda.at_image(q, images), _cuda.at_image(attention, images),
                       _cuda.at_image(out, images), *_sizes(q, attention, geometry)),
                      like=q, row_begin=images * channels)
    return out


def _message_backward_cuda(grad_out, q, attention, geometry, needs, images=0):
    need_q, need_attention = needs
    batch, channels, height, width = q.shape
    sizes = _sizes(q, attention, geometry)
    grad_q = grad_attention = None
    if need_q:
        grad_q = torch.empty_like(q)
        _cuda.launch_rows("message_backward_input", _SOURCE, batch * channels, height * width,
                          (_cuda.at_image(grad_out, images), _cuda.at_image(attention, images),
                           _cuda.at_image(grad_q, images), *sizes),
                          like=q, row_begin=images * channels)
    if need_attention:
        grad_attention = torch.empty_like(attention)
        _cuda.launch_rows("message_backward_attention", _SOURCE, batch * geometry.taps,
                          attention.shape[2] * attention.shape[3],
                          (_cuda.at_image(grad_out, images), _cuda.at_image(q, images),
                           _cuda.at_image(grad_attention, images), *sizes),
                          like=q, row_begin=images * geometry.taps)
    return grad_q, grad_attention


# ------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("segaware::crf_message", mutates_args=())
@no_autocast
def crf_message_op(q: Tensor, attention: Tensor, geometry: list[int]) -> Tensor:
    """out[n, c, p] = sum_k attention[n, k, p] * q_pad[n, c, p + offset_k]: a depthwise
    attention-weighted sum over the taps of `geometry` (N, C, H, W) -> (N, C, Ho, Wo)."""
    geometry = ConvGeometry.from_list(geometry)
    q, attention = q.contiguous(), attention.contiguous()
    path = _message_forward_cuda if q.is_cuda else _message_forward_cpu
    return path(q, attention, geometry)


@crf_message_op.register_fake
def _(q, attention, geometry):
    return q.new_empty((*q.shape[:2], *attention.shape[-2:]))


@torch.library.custom_op("segaware::crf_message_backward", mutates_args=())
@no_autocast
def crf_message_backward_op(grad_out: Tensor, q: Tensor, attention: Tensor, geometry: list[int],
                            needs: list[bool]) -> tuple[Tensor, Tensor]:
    """(grad_q, grad_attention), the exact gradients; an entry not in needs is empty."""
    geometry = ConvGeometry.from_list(geometry)
    grad_out, q, attention = grad_out.contiguous(), q.contiguous(), attention.contiguous()
    path = _message_backward_cuda if q.is_cuda else _message_backward_cpu
    grad_q, grad_attention = path(grad_out, q, attention, geometry, tuple(needs))
    return (grad_q if grad_q is not None else q.new_empty(0),
            grad_attention if grad_attention is not None else attention.new_empty(0))


@crf_message_backward_op.register_fake
def _(grad_out, q, attention, geometry, needs):
    return (torch.empty_like(q, memory_format=torch.contiguous_format) if needs[0]
            else q.new_empty(0),
            torch.empty_like(attention, memory_format=torch.contiguous_format) if needs[1]
            else attention.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, attention, geometry = inputs
    ctx.save_for_backward(q, attention)
    ctx.geometry = geometry


def _backward(ctx, grad_out):
    q, attention = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    if not any(needs):
        return None, None, None
    grad_q, grad_attention = crf_message_backward_op(grad_out, q, attention, ctx.geometry, needs)
    return (grad_q if needs[0] else None, grad_attention if needs[1] else None, None)


crf_message_op.register_autograd(_backward, setup_context=_setup_context)


def message_attention(features, spec):
    """softmax over the taps of -scale * im2dist_L2(features) (None for dilation 0, where it
    does not matter: every tap reads the same pixel)."""
    if spec.dilation == 0:
        return None
    geometry = spec.geometry
    dist = im2dist(features, geometry.kernel, pad=geometry.pad, stride=geometry.stride,
                   dilation=geometry.dilation, norm="L2", remove_center=spec.remove_center,
                   remove_bounds=spec.remove_bounds)
    return torch.softmax(dist * (-spec.scale), dim=1)


def message(q, attention, spec):
    """One message of the CRF on the grid of its geometry, (N, C, Ho, Wo)."""
    geometry = spec.geometry
    if attention is None:   # dilation 0: the zero-padded q, sampled at the stride
        out_size = geometry.output_size(*q.shape[-2:])
        return patch_view(pad_input(q, geometry), 0, 0, out_size, geometry.stride)
    return crf_message_op(q, attention, geometry.as_list())


def _as_input_frame(msg, height, width):
    """The message as the original's C x C products read it: the first C*H*W values of each
    image (the message itself when its grid is H x W). Each image's read starts at that image's
    own (C, Ho, Wo) buffer, as the original's per-image loop offsets the message blob by image;
    no golden case has N > 1 with a misaligned grid."""
    if msg.shape[-2:] == (height, width):
        return msg
    n, channels, grid_h, grid_w = msg.shape
    return msg.reshape(n, channels * grid_h * grid_w)[:, :channels * height * width].reshape(
        n, channels, height, width)


def message_grid_fits(spec, height, width):
    """(grid, fits): the message grid of `spec` on an H x W input, and whether it holds at least
    H*W values (the original reads H*W values per channel from it)."""
    out_h, out_w = spec.geometry.output_size(height, width)
    return (out_h, out_w), out_h >= 1 and out_w >= 1 and out_h * out_w >= height * width


def normconv_meanfield(unary, q0, feat_bilateral, feat_spatial, w_spatial, w_bilateral, compat, *,
                       num_iterations, bilateral, spatial):
    """The segmentation-aware CRF, exactly as the original computes it.

    unary, q0: (N, C, H, W) log-domain scores (q0 is soft-maxed at the start of iteration 0);
    feat_bilateral (N, Eb, H, W), feat_spatial (N, Es, H, W): attention features;
    w_spatial, w_bilateral, compat: (C, C) matrices (or (1, 1, C, C) Caffe blobs), [out][in];
    num_iterations: number of updates T >= 1; bilateral, spatial: MessageSpec of each message.
    Returns X_T (N, C, H, W), not normalised. Differentiable in every tensor argument.
    """
    autocast = (isinstance(unary, torch.Tensor) and unary.dtype != torch.float64
                and torch.is_autocast_enabled(unary.device.type))
    _check_inputs(unary, q0, feat_bilateral, feat_spatial, (w_spatial, w_bilateral, compat),
                  num_iterations, bilateral, spatial, autocast)
    # half inputs (and autocast) are computed in float32; the result comes back in the input's
    # (or the autocast) dtype
    out_dtype = torch.get_autocast_dtype(unary.device.type) if autocast else unary.dtype
    if autocast or unary.dtype in HALF_DTYPES:
        unary, q0, feat_bilateral, feat_spatial, w_spatial, w_bilateral, compat = (
            t.float() for t in (unary, q0, feat_bilateral, feat_spatial, w_spatial, w_bilateral,
                                compat))
    return _meanfield(unary, q0, feat_bilateral, feat_spatial, w_spatial, w_bilateral, compat,
                      num_iterations, bilateral, spatial).to(out_dtype)


@no_autocast
def _meanfield(unary, q0, feat_bilateral, feat_spatial, w_spatial, w_bilateral, compat,
               num_iterations, bilateral, spatial):
    attention_bilateral = message_attention(feat_bilateral, bilateral)
    attention_spatial = message_attention(feat_spatial, spatial)
    x = q0
    for _ in range(num_iterations):
        x = meanfield_update(x, unary, attention_bilateral, attention_spatial, w_spatial,
                             w_bilateral, compat, bilateral=bilateral, spatial=spatial)
    return x


def meanfield_update(x, unary, attention_bilateral, attention_spatial, w_spatial, w_bilateral, compat,
                     *, bilateral, spatial):
    """One CRF update X_{t+1} = U - compat · (W_s · S + W_b · B), with Q = softmax(X_t) and the
    attention maps of `message_attention` (inputs as checked by normconv_meanfield)."""
    n, channels, height, width = unary.shape
    w_spatial, w_bilateral, compat = (m.reshape(channels, channels) for m in (w_spatial, w_bilateral, compat))
    q = torch.softmax(x, dim=1)
    msg_spatial = _as_input_frame(message(q, attention_spatial, spatial), height, width)
    msg_bilateral = _as_input_frame(message(q, attention_bilateral, bilateral), height, width)
    plane = height * width
    mixed = (torch.matmul(w_spatial, msg_spatial.reshape(n, channels, plane))
             + torch.matmul(w_bilateral, msg_bilateral.reshape(n, channels, plane)))
    return unary - torch.matmul(compat, mixed).reshape(n, channels, height, width)


def _check_inputs(unary, q0, feat_bilateral, feat_spatial, matrices, num_iterations, bilateral,
                  spatial, autocast=False):
    for tensor, name in ((unary, "unary"), (q0, "q0"), (feat_bilateral, "feat_bilateral"),
                         (feat_spatial, "feat_spatial")):
        check_tensor("normconv_meanfield", name, tensor, dim=4)
    if q0.shape != unary.shape:
        raise ValueError(f"normconv_meanfield: q0 must have unary's shape {tuple(unary.shape)}, "
                         f"got {tuple(q0.shape)}")
    n, channels, height, width = unary.shape
    for feat, name in ((feat_bilateral, "feat_bilateral"), (feat_spatial, "feat_spatial")):
        if feat.shape[0] != n or feat.shape[2:] != unary.shape[2:]:
            raise ValueError(f"normconv_meanfield: {name} must have unary's batch and spatial size "
                             f"({n}, *, {height}, {width}), got {tuple(feat.shape)}")
    for matrix, name in zip(matrices, ("w_spatial", "w_bilateral", "compat")):
        if tuple(matrix.shape) not in ((channels, channels), (1, 1, channels, channels)):
            raise ValueError(f"normconv_meanfield: {name} must be ({channels}, {channels}) or "
                             f"(1, 1, {channels}, {channels}), got {tuple(matrix.shape)}")
    if num_iterations < 1:
        raise ValueError(f"normconv_meanfield: num_iterations must be >= 1, got {num_iterations}")
    for spec, name in ((bilateral, "bilateral"), (spatial, "spatial")):
        spec.validate(name)
        grid, fits = message_grid_fits(spec, height, width)
        if not fits:
            raise ValueError(f"normconv_meanfield: the {name} message grid {grid} holds fewer than "
                             f"the {height}x{width} values per channel the CRF reads (use stride 1 "
                             f"and pad = (kernel // 2) * dilation)")
    tensors = (unary, q0, feat_bilateral, feat_spatial, *matrices)
    dtypes = {t.dtype for t in tensors}
    if autocast:   # half activations next to float32 parameters
        dtypes = {torch.float32 if d in HALF_DTYPES else d for d in dtypes}
    if len(dtypes) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError(f"normconv_meanfield: all tensors must share one dtype and device, got "
                         f"{[(t.dtype, str(t.device)) for t in tensors]}")
