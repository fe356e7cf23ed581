"""NormConvMeanfield: the segmentation-aware CRF of the released ResNet models (SEMANTICS §4.2).

    A_b = softmax_k(-scale_b * im2dist_L2(F_b))      A_s likewise from F_s (computed once)
    X_0 = q0
    for t in 0..T-1:
        Q = softmax over channels of X_t
        B[c, p] = sum_k A_b[k, p] * Q[c, p + offset_k]      (bilateral message, zero outside)
        S[c, p] = sum_k A_s[k, p] * Q[c, p + offset_k]      (spatial message)
        X_{t+1} = U - compat · (W_s · S + W_b · B)          (C x C matrices, per pixel)
    return X_T                                               (log domain, not normalised)

The messages are the original's internal NormConv layers (depthwise, all-ones weights, no bias):
`MessageFunction` computes them tap by tap without a column matrix, and gives the exact gradient
to Q and to the attention. Everything else is composed of autograd-aware torch ops (exact, and
each iteration keeps only a few (N, C, H, W) tensors for backward). Because the attention depends
only on the features, it is computed once and its gradient accumulates over the iterations.

Quirks kept from the original (decision 1):
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
from torch.autograd.function import once_differentiable

from ._cuda import GRID_STRIDE_LOOP, launch
from .im2dist import PatchGeometry, check_image_batch, im2dist, pad_input, patch_view


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
        # built directly: PatchGeometry.of would reject the original's dilation 0
        return PatchGeometry((self.kernel,) * 2, (self.pad,) * 2, (self.stride,) * 2, (self.dilation,) * 2)

    def validate(self, what):
        if self.kernel < 1 or self.stride < 1 or self.pad < 0 or self.dilation < 0:
            raise ValueError(f"normconv_meanfield: {what} needs kernel >= 1, stride >= 1, pad >= 0 "
                             f"and dilation >= 0, got {self}")


# ------------------------------------------------------------------------------------------ CPU
def _message_forward_cpu(q, attention, geometry):
    out_size = attention.shape[-2:]
    padded = pad_input(q, geometry)
    out = q.new_zeros(*q.shape[:2], *out_size)
    for k in range(geometry.taps):
        i, j = divmod(k, geometry.kernel[1])
        offset = (i * geometry.dilation[0], j * geometry.dilation[1])
        out.addcmul_(patch_view(padded, *offset, out_size, geometry.stride), attention[:, k:k + 1])
    return out


def _message_backward_cpu(grad_out, q, attention, geometry, needs):
    need_q, need_attention = needs
    height, width = q.shape[-2:]
    out_size = attention.shape[-2:]
    padded = pad_input(q, geometry)
    grad_padded = torch.zeros_like(padded) if need_q else None
    grad_attention = torch.empty_like(attention) if need_attention else None
    for k in range(geometry.taps):
        i, j = divmod(k, geometry.kernel[1])
        offset = (i * geometry.dilation[0], j * geometry.dilation[1])
        if need_q:
            grad_tap = patch_view(grad_padded, *offset, out_size, geometry.stride)
            grad_tap.addcmul_(grad_out, attention[:, k:k + 1])
        if need_attention:
            # channel dot product per pixel (einsum beats mul-then-sum by about a third here)
            grad_attention[:, k] = torch.einsum("nchw,nchw->nhw", patch_view(padded, *offset, out_size,
                                                                            geometry.stride), grad_out)
    grad_q = None
    if need_q:
        pad_h, pad_w = geometry.pad
        grad_q = grad_padded[:, :, pad_h:pad_h + height, pad_w:pad_w + width]
    return grad_q, grad_attention


# ----------------------------------------------------------------------------------------- CUDA
# Same index decomposition and loop order as the CPU helpers; every kernel gathers (one thread per
# written element), so there are no atomics and results are deterministic.
_CUDA_SOURCE = GRID_STRIDE_LOOP + r"""
extern "C" __global__ void message_forward(
    const long long total, const scalar_t* q, const scalar_t* attention, scalar_t* out,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w) {
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    const int wo = index % out_w;
    const int ho = (index / out_w) % out_h;
    const long long nc = index / ((long long)out_w * out_h);
    const long long n = nc / channels;
    scalar_t sum = 0;
    for (int i = 0; i < kernel_h; ++i) {
      const int h = ho * stride_h - pad_h + i * dilation_h;
      if (h < 0 || h >= height) continue;
      for (int j = 0; j < kernel_w; ++j) {
        const int w = wo * stride_w - pad_w + j * dilation_w;
        if (w < 0 || w >= width) continue;
        const int k = i * kernel_w + j;
        sum += attention[((n * taps + k) * out_h + ho) * out_w + wo] * q[(nc * height + h) * width + w];
      }
    }
    out[index] = sum;
  }
}

extern "C" __global__ void message_backward_input(
    const long long total, const scalar_t* grad_out, const scalar_t* attention, scalar_t* grad_q,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w) {
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    const int w = index % width;
    const int h = (index / width) % height;
    const long long nc = index / ((long long)width * height);
    const long long n = nc / channels;
    scalar_t sum = 0;
    for (int i = 0; i < kernel_h; ++i) {
      const int h_offset = h + pad_h - i * dilation_h;
      if (h_offset < 0 || h_offset % stride_h != 0) continue;
      const int ho = h_offset / stride_h;
      if (ho >= out_h) continue;
      for (int j = 0; j < kernel_w; ++j) {
        const int w_offset = w + pad_w - j * dilation_w;
        if (w_offset < 0 || w_offset % stride_w != 0) continue;
        const int wo = w_offset / stride_w;
        if (wo >= out_w) continue;
        const int k = i * kernel_w + j;
        sum += attention[((n * taps + k) * out_h + ho) * out_w + wo]
               * grad_out[(nc * out_h + ho) * out_w + wo];
      }
    }
    grad_q[index] = sum;
  }
}

extern "C" __global__ void message_backward_attention(
    const long long total, const scalar_t* grad_out, const scalar_t* q, scalar_t* grad_attention,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w) {
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    const int wo = index % out_w;
    const int ho = (index / out_w) % out_h;
    const int k = (index / ((long long)out_w * out_h)) % taps;
    const long long n = index / ((long long)out_w * out_h * taps);
    const int i = k / kernel_w;
    const int j = k % kernel_w;
    const int h = ho * stride_h - pad_h + i * dilation_h;
    const int w = wo * stride_w - pad_w + j * dilation_w;
    scalar_t sum = 0;
    if (h >= 0 && h < height && w >= 0 && w < width) {
      for (int c = 0; c < channels; ++c) {
        sum += q[((n * channels + c) * height + h) * width + w]
               * grad_out[((n * channels + c) * out_h + ho) * out_w + wo];
      }
    }
    grad_attention[index] = sum;
  }
}
"""


def _geometry_args(q, attention, geometry):
    return [q.shape[1], q.shape[2], q.shape[3], attention.shape[2], attention.shape[3],
            *geometry.kernel, *geometry.pad, *geometry.stride, *geometry.dilation]


def _message_forward_cuda(q, attention, geometry):
    out = q.new_empty(*q.shape[:2], *attention.shape[-2:])
    launch("message_forward", _CUDA_SOURCE, out.numel(),
           [q, attention, out] + _geometry_args(q, attention, geometry), like=q)
    return out


def _message_backward_cuda(grad_out, q, attention, geometry, needs):
    need_q, need_attention = needs
    grad_out = grad_out.contiguous()
    args = _geometry_args(q, attention, geometry)
    grad_q = grad_attention = None
    if need_q:
        grad_q = torch.empty_like(q)
        launch("message_backward_input", _CUDA_SOURCE, grad_q.numel(),
               [grad_out, attention, grad_q] + args, like=q)
    if need_attention:
        grad_attention = torch.empty_like(attention)
        launch("message_backward_attention", _CUDA_SOURCE, grad_attention.numel(),
               [grad_out, q, grad_attention] + args, like=q)
    return grad_q, grad_attention


# ------------------------------------------------------------------------------------- autograd
class MessageFunction(torch.autograd.Function):
    """out[n, c, p] = sum_k attention[n, k, p] * q_pad[n, c, p + offset_k]: a depthwise
    attention-weighted sum over the taps of `geometry` (N, C, H, W) -> (N, C, Ho, Wo), with the
    exact gradient to q and to the attention."""

    @staticmethod
    def forward(ctx, q, attention, geometry):
        q, attention = q.contiguous(), attention.contiguous()
        forward_path = _message_forward_cuda if q.is_cuda else _message_forward_cpu
        out = forward_path(q, attention, geometry)
        ctx.save_for_backward(q, attention)
        ctx.geometry = geometry
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, attention = ctx.saved_tensors
        backward_path = _message_backward_cuda if q.is_cuda else _message_backward_cpu
        grad_q, grad_attention = backward_path(grad_out, q, attention, ctx.geometry,
                                               ctx.needs_input_grad[:2])
        return grad_q, grad_attention, None


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
    return MessageFunction.apply(q, attention, geometry)


def _as_input_frame(msg, height, width):
    """The message as the original's C x C products read it: the first C*H*W values of each
    image (the message itself when its grid is H x W). Each image's read starts at that image's
    own (C, Ho, Wo) buffer, as the original's per-image loop offsets the message blob by image;
    no golden case has N > 1 with a misaligned grid."""
    if msg.shape[-2:] == (height, width):
        return msg
    n, channels = msg.shape[:2]
    return msg.reshape(n, -1)[:, :channels * height * width].reshape(n, channels, height, width)


def message_grid_fits(spec, height, width):
    """(grid, fits): the message grid of `spec` on an H x W input, and whether it holds at least
    H*W values (the original reads H*W values per channel from it)."""
    out_h, out_w = spec.geometry.output_size(height, width)
    return (out_h, out_w), out_h >= 1 and out_w >= 1 and out_h * out_w >= height * width


def normconv_meanfield(unary, q0, feat_bilateral, feat_spatial, w_spatial, w_bilateral, compat, *,
                       num_iterations, bilateral, spatial):
    """The segmentation-aware CRF (SEMANTICS §4.2), exactly as the original computes it.

    unary, q0: (N, C, H, W) log-domain scores (q0 is soft-maxed at the start of iteration 0);
    feat_bilateral (N, Eb, H, W), feat_spatial (N, Es, H, W): attention features;
    w_spatial, w_bilateral, compat: (C, C) matrices (or (1, 1, C, C) Caffe blobs), [out][in];
    num_iterations: number of updates T >= 1; bilateral, spatial: MessageSpec of each message.
    Returns X_T (N, C, H, W), not normalised. Differentiable in every tensor argument.
    """
    _check_inputs(unary, q0, feat_bilateral, feat_spatial, (w_spatial, w_bilateral, compat),
                  num_iterations, bilateral, spatial)
    attention_bilateral = message_attention(feat_bilateral, bilateral)
    attention_spatial = message_attention(feat_spatial, spatial)
    x = q0
    for _ in range(num_iterations):
        x = meanfield_update(x, unary, attention_bilateral, attention_spatial, w_spatial, w_bilateral,
                             compat, bilateral=bilateral, spatial=spatial)
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
    mixed = (torch.matmul(w_spatial, msg_spatial.reshape(n, channels, -1))
             + torch.matmul(w_bilateral, msg_bilateral.reshape(n, channels, -1)))
    return unary - torch.matmul(compat, mixed).reshape(n, channels, height, width)


def _check_inputs(unary, q0, feat_bilateral, feat_spatial, matrices, num_iterations, bilateral, spatial):
    for tensor, name in ((unary, "unary"), (q0, "q0"), (feat_bilateral, "feat_bilateral"),
                         (feat_spatial, "feat_spatial")):
        check_image_batch(tensor, name, "normconv_meanfield")
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
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError(f"normconv_meanfield: all tensors must share one dtype and device, got "
                         f"{[(t.dtype, str(t.device)) for t in tensors]}")
