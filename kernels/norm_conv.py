"""NormConv: a convolution whose taps are weighted, per output pixel, by a softmax attention over
embedding distances.

    D = im2dist(emb)                         (N, K, Ho, Wo), K = kh*kw taps
    L = -scale * D   (or +D when scale_term is false: the original does not negate then)
    A = softmax over the K taps of L
    y[n, o, p] = sum_{c in group(o), k} W[o, c, k] * A[n, k, p] * x_pad[n, c, p + offset_k] + b[o]

The distances, logits and softmax are ordinary differentiable ops (dL/dscale = -D; im2dist's
own backward carries dL/dD to the embedding; the softmax backward is A * (G - sum_k A G)). The
attention-weighted convolution is the op `torch.ops.segaware.attention_conv` with its exact
backward for x, A, W and b. It never materialises the (C*K, Ho*Wo) column matrix: both paths
walk the taps and keep only the (N, K, Ho, Wo) attention for backward.

float16 / bfloat16 inputs are computed in float32 and the result cast back; under
torch.autocast the op computes in float32 and returns the autocast dtype.
"""
import torch
from torch import Tensor

from . import _cuda
from .geometry import (ConvGeometry, HALF_DTYPES, check_tensor, compute_dtype, no_autocast,
                       pad_input, register_tap_conv_autograd, tap_view, unpad)
from .im2dist import im2dist


# ------------------------------------------------------------------------------------------ CPU
def _forward_cpu(x, attention, weight, bias, geometry, group):
    n, channels = x.shape[:2]
    outputs = weight.shape[0]
    out_size = tuple(attention.shape[-2:])
    in_per_group, out_per_group = channels // group, outputs // group
    plane = out_size[0] * out_size[1]
    padded = pad_input(x, geometry)
    out = x.new_zeros(n, group, out_per_group, plane)
    for k in range(geometry.taps):
        i, j = divmod(k, geometry.kernel[1])
        weighted = tap_view(padded, geometry, k, out_size) * attention[:, k:k + 1]
        tap_weight = weight[:, :, i, j].reshape(group, out_per_group, in_per_group)
        # (group, O/g, C/g) @ (N, group, C/g, HW) -> (N, group, O/g, HW)
        out += torch.matmul(tap_weight, weighted.reshape(n, group, in_per_group, plane))
    out = out.reshape(n, outputs, *out_size)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def _backward_cpu(grad_out, x, attention, weight, geometry, group, needs):
    """(grad_x, G, grad_weight); G[n, k, p] = sum_c x_tap[c] * (W^T g)[c, k] is the attention's
    gradient. Entries not in `needs` = (x, attention, weight) are None."""
    n, channels, height, width = x.shape
    outputs = weight.shape[0]
    out_size = tuple(attention.shape[-2:])
    plane = out_size[0] * out_size[1]
    in_per_group, out_per_group = channels // group, outputs // group
    need_x, need_attention, need_weight = needs
    padded = pad_input(x, geometry)
    grad = grad_out.reshape(n, group, out_per_group, plane)
    grad_padded = torch.zeros_like(padded) if need_x else None
    tap_grads = x.new_empty(attention.shape) if need_attention else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    for k in range(geometry.taps):
        i, j = divmod(k, geometry.kernel[1])
        tap_weight = weight[:, :, i, j].reshape(group, out_per_group, in_per_group)
        tap = tap_view(padded, geometry, k, out_size)
        if need_x or need_attention:
            col_grad = torch.matmul(tap_weight.transpose(1, 2), grad).reshape(n, channels,
                                                                             *out_size)
            if need_attention:
                tap_grads[:, k] = torch.einsum("nchw,nchw->nhw", tap, col_grad)
            if need_x:
                # col2im of one tap: add into the pixels this tap read
                tap_view(grad_padded, geometry, k, out_size).add_(col_grad * attention[:, k:k + 1])
        if need_weight:
            # dW[o, c, k] = sum over images and pixels of g[o] * A[k] * x_tap[c]
            weighted = (tap * attention[:, k:k + 1]).reshape(n, group, in_per_group, plane)
            per_image = torch.matmul(grad, weighted.transpose(2, 3))
            grad_weight[:, :, i, j] = per_image.sum(0).reshape(outputs, in_per_group)
    grad_x = unpad(grad_padded, geometry, height, width).contiguous() if need_x else None
    return grad_x, tap_grads, grad_weight


# ----------------------------------------------------------------------------------------- CUDA
# kernels/cuda/norm_conv.cu; the weight gradient (a reduction over every pixel) is the CPU
# path's batched matmul per tap, which is device-agnostic.
_SOURCE = ("norm_conv.cu",)


def _sizes(x, weight, attention, geometry, group):
    _, channels, height, width = x.shape
    return (*_cuda.geometry_args(geometry, channels, height, width, attention.shape[-2:]),
            weight.shape[0], group)


def _forward_cuda(x, attention, weight, bias, geometry, group, images=0):
    outputs = weight.shape[0]
    out = x.new_empty(x.shape[0], outputs, *attention.shape[-2:])
    _cuda.launch_rows("norm_conv_forward", _SOURCE, x.shape[0] * outputs,
                      attention.shape[2] * attention.shape[3],
                      (_cuda.at_image(x, images), _cuda.at_image(attention, images), weight,
                       bias if bias is not None else weight, bias is not None,
                       _cuda.at_image(out, images), *_sizes(x, weight, attention, geometry, group)),
                      like=x, row_begin=images * outputs)
    return out


def _backward_cuda(grad_out, x, attention, weight, geometry, group, needs, images=0):
    need_x, need_attention, need_weight = needs
    batch, channels, height, width = x.shape
    sizes = _sizes(x, weight, attention, geometry, group)
    grad_x = tap_grads = grad_weight = None
    if need_x:
        grad_x = torch.empty_like(x)
        _cuda.launch_rows("norm_conv_backward_input", _SOURCE, batch * channels, height * width,
                          (_cuda.at_image(grad_out, images), _cuda.at_image(attention, images),
                           weight, _cuda.at_image(grad_x, images), *sizes),
                          like=x, row_begin=images * channels)
    if need_attention:
        tap_grads = torch.empty_like(attention)
        _cuda.launch_rows("norm_conv_backward_taps", _SOURCE, batch * geometry.taps,
                          attention.shape[2] * attention.shape[3],
                          (_cuda.at_image(grad_out, images), _cuda.at_image(x, images), weight,
                           _cuda.at_image(tap_grads, images), *sizes),
                          like=x, row_begin=images * geometry.taps)
    if need_weight:
        grad_weight = _backward_cpu(grad_out, x, attention, weight, geometry, group,
                                    (False, False, True))[2]
    return grad_x, tap_grads, grad_weight


# ------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("segaware::attention_conv", mutates_args=())
@no_autocast
def attention_conv_op(x: Tensor, attention: Tensor, weight: Tensor, bias: Tensor | None,
                      geometry: list[int], group: int) -> Tensor:
    """y = sum_{c,k} W[o,c,k] * A[k,p] * x_pad[c, p + offset_k] + b[o], grouped; x (N, C, H, W),
    attention (N, K, Ho, Wo), weight (O, C/group, kh, kw), bias (O) or None, one dtype."""
    geometry = ConvGeometry.from_list(geometry)
    x, attention, weight = x.contiguous(), attention.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    path = _forward_cuda if x.is_cuda else _forward_cpu
    return path(x, attention, weight, bias, geometry, group)


@attention_conv_op.register_fake
def _(x, attention, weight, bias, geometry, group):
    return x.new_empty((x.shape[0], weight.shape[0], *attention.shape[-2:]))


@torch.library.custom_op("segaware::attention_conv_backward", mutates_args=())
@no_autocast
def attention_conv_backward_op(grad_out: Tensor, x: Tensor, attention: Tensor, weight: Tensor,
                               geometry: list[int], group: int,
                               needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_attention, grad_weight, grad_bias); entries not in needs are empty."""
    geometry = ConvGeometry.from_list(geometry)
    grad_out, x = grad_out.contiguous(), x.contiguous()
    attention, weight = attention.contiguous(), weight.contiguous()
    path = _backward_cuda if x.is_cuda else _backward_cpu
    grads = path(grad_out, x, attention, weight, geometry, group, tuple(needs[:3]))
    grad_bias = grad_out.sum((0, 2, 3)) if needs[3] else grad_out.new_empty(0)
    empty = (x.new_empty(0), attention.new_empty(0), weight.new_empty(0))
    return (*(g if g is not None else e for g, e in zip(grads, empty)), grad_bias)


@attention_conv_backward_op.register_fake
def _(grad_out, x, attention, weight, geometry, group, needs):
    def like(tensor, needed):
        return (torch.empty_like(tensor, memory_format=torch.contiguous_format) if needed
                else tensor.new_empty(0))
    return (like(x, needs[0]), like(attention, needs[1]), like(weight, needs[2]),
            grad_out.new_empty((weight.shape[0],) if needs[3] else (0,)))


register_tap_conv_autograd(attention_conv_op, attention_conv_backward_op)


def norm_conv(x, emb, weight, bias=None, scale=None, *, kernel_size, pad=0, stride=1, dilation=1,
              group=1, norm="L2", remove_center=False, remove_bounds=False, scale_term=True):
    """Segmentation-aware convolution of `x` (N, C, H, W) guided by the embedding `emb`
    (N, E, H, W), as the original NormConv layer computes it.

    weight (O, C/group, kh, kw); bias (O,) or None; scale: a 1-element tensor, required when
    `scale_term` (attention = softmax(-scale * D)); without scale_term the attention is
    softmax(+D), as in the original. D = im2dist(emb, ..., norm, remove_center, remove_bounds).
    kernel_size, pad, stride, dilation: ints or (h, w) pairs. Returns (N, O, Ho, Wo); N may be
    0. Differentiable in x, emb, weight, bias and scale.
    """
    geometry = ConvGeometry.of(kernel_size, pad, stride, dilation)
    autocast = (isinstance(x, torch.Tensor) and x.dtype != torch.float64
                and torch.is_autocast_enabled(x.device.type))
    _check_inputs(x, emb, weight, bias, scale, geometry, group, scale_term, autocast)
    if autocast:   # computed in float32, returned in the autocast dtype
        dtype, out_dtype = torch.float32, torch.get_autocast_dtype(x.device.type)
    else:
        dtype, out_dtype = compute_dtype(x.dtype), x.dtype
    out = _norm_conv(x.to(dtype), emb.to(dtype), weight.to(dtype),
                     bias.to(dtype) if bias is not None else None,
                     scale.to(dtype) if scale_term else None, geometry, group, norm,
                     remove_center, remove_bounds)
    return out.to(out_dtype)


@no_autocast
def _norm_conv(x, emb, weight, bias, scale, geometry, group, norm, remove_center, remove_bounds):
    dist = im2dist(emb, geometry.kernel, pad=geometry.pad, stride=geometry.stride,
                   dilation=geometry.dilation, norm=norm, remove_center=remove_center,
                   remove_bounds=remove_bounds)
    logits = dist * (-scale).reshape(()) if scale is not None else dist
    attention = torch.softmax(logits, dim=1)
    return attention_conv_op(x, attention, weight, bias, geometry.as_list(), group)


def _check_inputs(x, emb, weight, bias, scale, geometry, group, scale_term, autocast):
    check_tensor("norm_conv", "x", x, dim=4)
    check_tensor("norm_conv", "emb", emb, dim=4)
    if x.shape[0] != emb.shape[0] or x.shape[2:] != emb.shape[2:]:
        raise ValueError(f"norm_conv: emb must have x's batch size and spatial size "
                         f"({x.shape[0]}, *, {x.shape[2]}, {x.shape[3]}), got {tuple(emb.shape)}")
    geometry.check_output_size(x.shape[2], x.shape[3], "norm_conv")
    channels, outputs = x.shape[1], weight.shape[0]
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or channels % group \
            or outputs % group:
        raise ValueError(f"norm_conv: group {group} must divide the {channels} input channels and "
                         f"the {outputs} outputs")
    check_tensor("norm_conv", "weight", weight, shape=(outputs, channels // group, *geometry.kernel))
    if bias is not None:
        check_tensor("norm_conv", "bias", bias, shape=(outputs,))
    if scale_term and (scale is None or scale.numel() != 1):
        raise ValueError(f"norm_conv: scale_term needs a 1-element scale tensor, got "
                         f"{None if scale is None else tuple(scale.shape)}")
    tensors = [t for t in (x, emb, weight, bias, scale if scale_term else None) if t is not None]
    dtypes = {t.dtype for t in tensors}
    # under autocast, half activations next to float32 parameters are expected
    if autocast:
        dtypes = {torch.float32 if d in HALF_DTYPES else d for d in dtypes}
    if len(dtypes) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError(f"norm_conv: all tensors must share one dtype and device, got "
                         f"{[(str(t.dtype), str(t.device)) for t in tensors]}")
