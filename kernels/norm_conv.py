"""NormConv: a convolution whose taps are weighted, per output pixel, by a softmax attention over
embedding distances (SEMANTICS §4.1).

    D = im2dist(emb)                         (N, K, Ho, Wo), K = kh*kw taps
    L = -scale * D   (or +D when scale_term is false: the original does not negate then)
    A = softmax over the K taps of L
    y[n, o, p] = sum_{c in group(o), k} W[o, c, k] * A[n, k, p] * x_pad[n, c, p + offset_k] + b[o]

`NormConvFunction` takes the attention logits L (so that the scale and the distances get their
gradients from autograd: dL/dscale = -D, and im2dist's own backward carries dL/dD to the
embedding) and does the softmax, the weighted convolution and their exact backward itself. It
never materialises the (C*K, Ho*Wo) column matrix: both paths walk the taps and keep only the
(N, K, Ho, Wo) attention for backward.

Geometry (`PatchGeometry`) and the strided tap views come from kernels/im2dist.py.
"""
import torch
from torch.autograd.function import once_differentiable

from ._cuda import GRID_STRIDE_LOOP, launch
from .im2dist import PatchGeometry, check_image_batch, im2dist, pad_input, patch_view


# ------------------------------------------------------------------------------------------ CPU
def _norm_conv_forward_cpu(x, attention, weight, bias, geometry, group):
    kernel, pad, stride, dilation = geometry.kernel, geometry.pad, geometry.stride, geometry.dilation
    n, channels = x.shape[:2]
    outputs = weight.shape[0]
    out_h, out_w = attention.shape[-2:]
    in_per_group, out_per_group = channels // group, outputs // group
    padded = pad_input(x, geometry)
    out = x.new_zeros(n, group, out_per_group, out_h * out_w)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            k = i * kernel[1] + j
            tap = patch_view(padded, i * dilation[0], j * dilation[1], (out_h, out_w), stride)
            weighted = tap * attention[:, k:k + 1]
            tap_weight = weight[:, :, i, j].reshape(group, out_per_group, in_per_group)
            # (group, O/g, C/g) @ (N, group, C/g, HW) -> (N, group, O/g, HW)
            out += torch.matmul(tap_weight, weighted.reshape(n, group, in_per_group, -1))
    out = out.reshape(n, outputs, out_h, out_w)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def _norm_conv_backward_cpu(grad_out, x, attention, weight, geometry, group, needs):
    """Returns (grad_x, G, grad_weight); G[n, k, p] = sum_c x_tap[c] * (W^T g)[c, k] is what the
    attention's gradient is made of. Entries not in `needs` = (x, attention, weight) are None."""
    kernel, pad, stride, dilation = geometry.kernel, geometry.pad, geometry.stride, geometry.dilation
    n, channels, height, width = x.shape
    outputs = weight.shape[0]
    out_h, out_w = attention.shape[-2:]
    in_per_group, out_per_group = channels // group, outputs // group
    need_x, need_attention, need_weight = needs
    padded = pad_input(x, geometry)
    grad = grad_out.reshape(n, group, out_per_group, out_h * out_w)
    grad_padded = torch.zeros_like(padded) if need_x else None
    tap_grads = x.new_empty(attention.shape) if need_attention else None
    if need_x or need_attention:
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                k = i * kernel[1] + j
                tap_weight = weight[:, :, i, j].reshape(group, out_per_group, in_per_group)
                col_grad = torch.matmul(tap_weight.transpose(1, 2), grad).reshape(n, channels, out_h, out_w)
                if need_attention:
                    tap = patch_view(padded, i * dilation[0], j * dilation[1], (out_h, out_w), stride)
                    tap_grads[:, k] = torch.einsum("nchw,nchw->nhw", tap, col_grad)
                if need_x:
                    # col2im of one tap: add into the pixels this tap read
                    patch_view(grad_padded, i * dilation[0], j * dilation[1], (out_h, out_w), stride).add_(
                        col_grad * attention[:, k:k + 1])
    grad_x = None
    if need_x:
        grad_x = grad_padded[:, :, pad[0]:pad[0] + height, pad[1]:pad[1] + width]
    grad_weight = _grad_weight(grad_out, x, attention, weight, geometry, group) if need_weight else None
    return grad_x, tap_grads, grad_weight


def _grad_weight(grad_out, x, attention, weight, geometry, group):
    """dW[o, c, k] = sum over images and pixels of g[o] * A[k] * x_tap[c]. Plain torch ops, used by
    both paths: a reduction over every pixel is a batched matmul per tap."""
    kernel, pad, stride, dilation = geometry.kernel, geometry.pad, geometry.stride, geometry.dilation
    n, channels = x.shape[:2]
    outputs = weight.shape[0]
    out_h, out_w = attention.shape[-2:]
    in_per_group, out_per_group = channels // group, outputs // group
    padded = pad_input(x, geometry)
    grad = grad_out.reshape(n, group, out_per_group, out_h * out_w)
    grad_weight = torch.empty_like(weight)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            k = i * kernel[1] + j
            tap = patch_view(padded, i * dilation[0], j * dilation[1], (out_h, out_w), stride)
            weighted = tap * attention[:, k:k + 1]
            per_image = torch.matmul(grad, weighted.reshape(n, group, in_per_group, -1).transpose(2, 3))
            grad_weight[:, :, i, j] = per_image.sum(0).reshape(outputs, in_per_group)
    return grad_weight


# ----------------------------------------------------------------------------------------- CUDA
# Index decomposition and loop order are those of the CPU helpers above. Every kernel gathers
# (one thread per written element), so no atomics: results are deterministic.
_CUDA_SOURCE = GRID_STRIDE_LOOP + r"""
extern "C" __global__ void norm_conv_forward(
    const long long total, const scalar_t* x, const scalar_t* attention, const scalar_t* weight,
    const scalar_t* bias, const int has_bias, scalar_t* out,
    const int channels, const int height, const int width, const int outputs,
    const int out_h, const int out_w, const int group,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w) {
  const int in_per_group = channels / group;
  const int out_per_group = outputs / group;
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    const int wo = index % out_w;
    const int ho = (index / out_w) % out_h;
    const int o = (index / ((long long)out_w * out_h)) % outputs;
    const long long n = index / ((long long)out_w * out_h * outputs);
    const int first_channel = (o / out_per_group) * in_per_group;
    scalar_t sum = 0;
    for (int i = 0; i < kernel_h; ++i) {
      const int h = ho * stride_h - pad_h + i * dilation_h;
      if (h < 0 || h >= height) continue;
      for (int j = 0; j < kernel_w; ++j) {
        const int w = wo * stride_w - pad_w + j * dilation_w;
        if (w < 0 || w >= width) continue;
        const int k = i * kernel_w + j;
        const scalar_t a = attention[((n * taps + k) * out_h + ho) * out_w + wo];
        scalar_t tap_sum = 0;
        for (int c = 0; c < in_per_group; ++c) {
          tap_sum += weight[((long long)(o * in_per_group + c) * kernel_h + i) * kernel_w + j]
                     * x[((n * channels + first_channel + c) * height + h) * width + w];
        }
        sum += a * tap_sum;
      }
    }
    out[index] = has_bias ? sum + bias[o] : sum;
  }
}

extern "C" __global__ void norm_conv_backward_input(
    const long long total, const scalar_t* grad_out, const scalar_t* attention,
    const scalar_t* weight, scalar_t* grad_x,
    const int channels, const int height, const int width, const int outputs,
    const int out_h, const int out_w, const int group,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w) {
  const int in_per_group = channels / group;
  const int out_per_group = outputs / group;
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    const int w = index % width;
    const int h = (index / width) % height;
    const int c = (index / ((long long)width * height)) % channels;
    const long long n = index / ((long long)width * height * channels);
    const int c_in_group = c % in_per_group;
    const int first_output = (c / in_per_group) * out_per_group;
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
        scalar_t col_grad = 0;
        for (int o = first_output; o < first_output + out_per_group; ++o) {
          col_grad += weight[((long long)(o * in_per_group + c_in_group) * kernel_h + i) * kernel_w + j]
                      * grad_out[((n * outputs + o) * out_h + ho) * out_w + wo];
        }
        sum += col_grad * attention[((n * taps + k) * out_h + ho) * out_w + wo];
      }
    }
    grad_x[index] = sum;
  }
}

extern "C" __global__ void norm_conv_backward_taps(
    const long long total, const scalar_t* grad_out, const scalar_t* x, const scalar_t* weight,
    scalar_t* tap_grads,
    const int channels, const int height, const int width, const int outputs,
    const int out_h, const int out_w, const int group,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w) {
  const int in_per_group = channels / group;
  const int out_per_group = outputs / group;
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
        const int first_output = (c / in_per_group) * out_per_group;
        const int c_in_group = c % in_per_group;
        scalar_t col_grad = 0;
        for (int o = first_output; o < first_output + out_per_group; ++o) {
          col_grad += weight[((long long)(o * in_per_group + c_in_group) * kernel_h + i) * kernel_w + j]
                      * grad_out[((n * outputs + o) * out_h + ho) * out_w + wo];
        }
        sum += x[((n * channels + c) * height + h) * width + w] * col_grad;
      }
    }
    tap_grads[index] = sum;
  }
}
"""


def _geometry_args(x, weight, attention, geometry, group):
    kernel, pad, stride, dilation = geometry.kernel, geometry.pad, geometry.stride, geometry.dilation
    channels, height, width = x.shape[1:]
    out_h, out_w = attention.shape[-2:]
    return [channels, height, width, weight.shape[0], out_h, out_w, group,
            kernel[0], kernel[1], pad[0], pad[1], stride[0], stride[1], dilation[0], dilation[1]]


def _norm_conv_forward_cuda(x, attention, weight, bias, geometry, group):
    out = x.new_empty(x.shape[0], weight.shape[0], *attention.shape[-2:])
    launch("norm_conv_forward", _CUDA_SOURCE, out.numel(),
           [x, attention, weight, bias if bias is not None else weight, int(bias is not None), out]
           + _geometry_args(x, weight, attention, geometry, group), like=x)
    return out


def _norm_conv_backward_cuda(grad_out, x, attention, weight, geometry, group, needs):
    need_x, need_attention, need_weight = needs
    grad_out = grad_out.contiguous()
    args = _geometry_args(x, weight, attention, geometry, group)
    grad_x = tap_grads = grad_weight = None
    if need_x:
        grad_x = torch.empty_like(x)
        launch("norm_conv_backward_input", _CUDA_SOURCE, grad_x.numel(),
               [grad_out, attention, weight, grad_x] + args, like=x)
    if need_attention:
        tap_grads = torch.empty_like(attention)
        launch("norm_conv_backward_taps", _CUDA_SOURCE, tap_grads.numel(),
               [grad_out, x, weight, tap_grads] + args, like=x)
    if need_weight:
        grad_weight = _grad_weight(grad_out, x, attention, weight, geometry, group)
    return grad_x, tap_grads, grad_weight


# ------------------------------------------------------------------------------------- autograd
class NormConvFunction(torch.autograd.Function):
    """y = sum_{c,k} W[o,c,k] * softmax_k(logits)[k,p] * x_pad[c, p + offset_k] + b[o], grouped.

    Inputs: x (N, C, H, W), logits (N, K, Ho, Wo), weight (O, C/group, kh, kw), bias (O) or None,
    a PatchGeometry and group. Returns (N, O, Ho, Wo). The backward is the exact derivative for
    all four tensors (the original leaves dx unwritten for 1x1 stride-1 pad-0 layers; we always
    give it)."""

    @staticmethod
    def forward(ctx, x, logits, weight, bias, geometry, group):
        x, weight = x.contiguous(), weight.contiguous()
        attention = torch.softmax(logits, dim=1).contiguous()
        forward_path = _norm_conv_forward_cuda if x.is_cuda else _norm_conv_forward_cpu
        out = forward_path(x, attention, weight, bias.contiguous() if bias is not None else None,
                           geometry, group)
        ctx.save_for_backward(x, attention, weight)
        ctx.geometry, ctx.group = geometry, group
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, attention, weight = ctx.saved_tensors
        need_x, need_logits, need_weight, need_bias = ctx.needs_input_grad[:4]
        backward_path = _norm_conv_backward_cuda if x.is_cuda else _norm_conv_backward_cpu
        grad_x, tap_grads, grad_weight = backward_path(grad_out, x, attention, weight, ctx.geometry,
                                                       ctx.group, (need_x, need_logits, need_weight))
        grad_logits = None
        if need_logits:
            # softmax backward: A * (G - sum_k A*G)
            grad_logits = attention * (tap_grads - (attention * tap_grads).sum(1, keepdim=True))
        grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
        return grad_x, grad_logits, grad_weight, grad_bias, None, None


def norm_conv(x, emb, weight, bias=None, scale=None, *, kernel_size, pad=0, stride=1, dilation=1,
              group=1, norm="L2", remove_center=False, remove_bounds=False, scale_term=True):
    """Segmentation-aware convolution of `x` (N, C, H, W) guided by the embedding `emb`
    (N, E, H, W), as the original NormConv layer (SEMANTICS §4.1).

    weight (O, C/group, kh, kw); bias (O,) or None; scale: a 1-element tensor, required when
    `scale_term` (attention = softmax(-scale * D)); without scale_term the attention is
    softmax(+D), as in the original. D = im2dist(emb, ..., norm, remove_center, remove_bounds).
    kernel_size, pad, stride, dilation: ints or (h, w) pairs. Returns (N, O, Ho, Wo).
    Differentiable in x, emb, weight, bias and scale.
    """
    geometry = PatchGeometry.of(kernel_size, pad, stride, dilation)
    _check_inputs(x, emb, weight, bias, scale, geometry, group, scale_term)
    dist = im2dist(emb, geometry.kernel, pad=geometry.pad, stride=geometry.stride,
                   dilation=geometry.dilation, norm=norm, remove_center=remove_center,
                   remove_bounds=remove_bounds)
    logits = dist * (-scale).reshape(()) if scale_term else dist
    return NormConvFunction.apply(x, logits, weight, bias, geometry, group)


def _check_inputs(x, emb, weight, bias, scale, geometry, group, scale_term):
    check_image_batch(x, "x", "norm_conv")
    check_image_batch(emb, "emb", "norm_conv")
    if x.shape[0] != emb.shape[0] or x.shape[2:] != emb.shape[2:]:
        raise ValueError(f"norm_conv: emb must have x's batch size and spatial size "
                         f"({x.shape[0]}, *, {x.shape[2]}, {x.shape[3]}), got {tuple(emb.shape)}")
    geometry.check_output_size(x.shape[2], x.shape[3])
    channels, outputs = x.shape[1], weight.shape[0]
    if group < 1 or channels % group or outputs % group:
        raise ValueError(f"norm_conv: group {group} must divide the {channels} input channels and "
                         f"the {outputs} outputs")
    expected = (outputs, channels // group, *geometry.kernel)
    if tuple(weight.shape) != expected:
        raise ValueError(f"norm_conv: weight must have shape {expected}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (outputs,):
        raise ValueError(f"norm_conv: bias must have shape ({outputs},), got {tuple(bias.shape)}")
    if scale_term and (scale is None or scale.numel() != 1):
        raise ValueError(f"norm_conv: scale_term needs a 1-element scale tensor, got "
                         f"{None if scale is None else tuple(scale.shape)}")
    tensors = [t for t in (x, emb, weight, bias, scale if scale_term else None) if t is not None]
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError(f"norm_conv: all tensors must share one dtype and device, got "
                         f"{[(t.dtype, str(t.device)) for t in tensors]}")
