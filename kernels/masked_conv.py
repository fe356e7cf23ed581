"""Fused segmentation-aware convolution (issue #4, SEMANTICS §5).

The released configs compute each segmentation-aware convolution as

    Conv_bottom_is_im2col( Im2col(x) * Tile(mask, C) ),   mask = exp(-|lam * Im2dist_L1(emb)|)

i.e. y[n, o, p] = b[o] + sum_{c, k} W[o, c, k] * x[n, c, p + offset_k] * mask[n, k, p]
(zero padding outside the image). Written that way it stores three (N, C*K, Ho*Wo) tensors. Here
the masked columns are built a band of output rows at a time, each band multiplied by the weights
at once, so only a band-sized buffer exists; backward recomputes the bands.

The mask chain (K x Ho x Wo, small) runs as ordinary differentiable ops on top of `im2dist`, so
its gradients follow the original's rules: AbsVal's sign(0) = 0 (torch.abs) and Im2dist L1 with
sign(0) = 0. The fused part is linear in x, mask and W, so its backward is the exact derivative.
"""
import torch
from torch.autograd.function import once_differentiable

from . import _cuda
from .im2dist import PatchGeometry, check_image_batch, im2dist, pad_input, patch_view, tap_offsets

# Bytes of masked columns per band: about a cache-sized block on CPU (4-8 MB measured best for
# vgg conv1_2 on one thread); on CUDA a band is large (fewer launches) but still far below the
# unfused (N, C*K, Ho*Wo) tensors.
CPU_BAND_BYTES = 8 << 20
CUDA_BAND_BYTES = 256 << 20


def band_rows(batch, channels, taps, out_w, itemsize, budget):
    """How many output rows one band holds (at least 1)."""
    row_bytes = batch * channels * taps * out_w * itemsize
    return max(1, budget // max(1, row_bytes))


def _band_view(padded, offset_h, offset_w, row_start, row_end, out_w, stride):
    """Pixels of one tap for output rows [row_start, row_end): (N, C, rows, Wo) strided view."""
    return patch_view(padded, row_start * stride[0] + offset_h, offset_w,
                      (row_end - row_start, out_w), stride)


# ---------------------------------------------------------------------------------------------
# CPU (vectorised torch; loops over bands of output rows and the K taps)

def _masked_columns_cpu(padded, mask, geometry, row_start, row_end, columns):
    """Fill columns (N, C, K, rows, Wo) with x[c, p + offset_k] * mask[k, p] for the band."""
    out_w = mask.shape[3]
    for k, (_, _, offset_h, offset_w) in enumerate(tap_offsets(geometry)):
        pixels = _band_view(padded, offset_h, offset_w, row_start, row_end, out_w, geometry.stride)
        torch.mul(pixels, mask[:, k, row_start:row_end].unsqueeze(1), out=columns[:, :, k])
    return columns


def _masked_conv_forward_cpu(x, mask, weight, bias, geometry, group):
    batch, channels, _, _ = x.shape
    out_h, out_w = mask.shape[2:]
    num_output = weight.shape[0]
    taps = geometry.taps
    padded = pad_input(x, geometry)
    weight_groups = weight.reshape(group, num_output // group, channels // group * taps)
    bias_groups = bias.view(group, -1, 1) if bias is not None else None
    out = x.new_empty((batch, num_output, out_h, out_w))
    rows = band_rows(batch, channels, taps, out_w, x.element_size(), CPU_BAND_BYTES)
    buffer = x.new_empty((batch, channels, taps, rows, out_w))
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band = row_end - row_start
        columns = _masked_columns_cpu(padded, mask, geometry, row_start, row_end,
                                      buffer[:, :, :, :band])
        columns = columns.reshape(batch, group, channels // group * taps, band * out_w)
        out_groups = out[:, :, row_start:row_end].view(batch, group, num_output // group, band,
                                                       out_w)
        # 2-D products (torch.mm) rather than a broadcast matmul: batched GEMM is slower on CPU
        for n in range(batch):
            for g in range(group):
                if bias_groups is None:
                    band_out = torch.mm(weight_groups[g], columns[n, g])
                else:
                    band_out = torch.addmm(bias_groups[g], weight_groups[g], columns[n, g])
                out_groups[n, g] = band_out.view(-1, band, out_w)
    return out


def _masked_conv_backward_cpu(x, mask, weight, grad_out, geometry, group, needs):
    need_x, need_mask, need_weight, need_bias = needs
    batch, channels, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    num_output = weight.shape[0]
    taps = geometry.taps
    group_columns = channels // group * taps
    padded = pad_input(x, geometry)
    weight_groups = weight.reshape(group, num_output // group, group_columns)
    grad_padded = torch.zeros_like(padded) if need_x else None
    grad_mask = torch.empty_like(mask) if need_mask else None
    grad_weight = torch.zeros_like(weight_groups) if need_weight else None
    rows = band_rows(batch, channels, taps, out_w, x.element_size(), CPU_BAND_BYTES)
    buffer = x.new_empty((batch, channels, taps, rows, out_w))
    grad_buffer = (x.new_empty((batch, group, group_columns, rows * out_w))
                   if need_x or need_mask else None)
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band = row_end - row_start
        grad_band = grad_out[:, :, row_start:row_end].reshape(
            batch, group, num_output // group, band * out_w)
        if need_weight:
            columns = _masked_columns_cpu(padded, mask, geometry, row_start, row_end,
                                          buffer[:, :, :, :band])
            columns = columns.reshape(batch, group, group_columns, band * out_w)
            for n in range(batch):
                for g in range(group):
                    grad_weight[g].addmm_(grad_band[n, g], columns[n, g].t())
        if need_x or need_mask:
            grad_columns = grad_buffer if band == rows else x.new_empty(
                (batch, group, group_columns, band * out_w))
            for n in range(batch):
                for g in range(group):
                    torch.mm(weight_groups[g].t(), grad_band[n, g], out=grad_columns[n, g])
            grad_columns = grad_columns.view(batch, channels, taps, band, out_w)
            for k, (_, _, offset_h, offset_w) in enumerate(tap_offsets(geometry)):
                if need_mask:
                    pixels = _band_view(padded, offset_h, offset_w, row_start, row_end, out_w,
                                        geometry.stride)
                    grad_mask[:, k, row_start:row_end] = (grad_columns[:, :, k] * pixels).sum(1)
                if need_x:
                    target = _band_view(grad_padded, offset_h, offset_w, row_start, row_end, out_w,
                                        geometry.stride)
                    target.addcmul_(grad_columns[:, :, k],
                                    mask[:, k, row_start:row_end].unsqueeze(1))
    grad_x = None
    if need_x:
        pad_h, pad_w = geometry.pad
        grad_x = grad_padded[:, :, pad_h:pad_h + height, pad_w:pad_w + width]
    grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
    if need_weight:
        grad_weight = grad_weight.reshape(weight.shape)
    return grad_x, grad_mask, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# CUDA: CuPy kernels build the masked band columns and scatter-free gradients; the weight
# products are torch matmuls (cuBLAS). Same band loop and index order as the CPU path.

_CUDA_SOURCE = _cuda.GRID_STRIDE_LOOP + r"""
// columns (N, C, K, band, Wo) = x[n, c, pixel of tap k] * mask[n, k, row_start + r, wo]
extern "C" __global__ void masked_columns(
    const long long total, const scalar_t* x, const scalar_t* mask, scalar_t* columns,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w,
    const int row_start, const int band) {
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    const int wo = index % out_w;
    const int r = (index / out_w) % band;
    const int k = (index / ((long long)out_w * band)) % taps;
    const int c = (index / ((long long)out_w * band * taps)) % channels;
    const long long n = index / ((long long)out_w * band * taps * channels);
    const int ho = row_start + r;
    const int i = k / kernel_w, j = k % kernel_w;
    const int h = ho * stride_h - pad_h + i * dilation_h;
    const int w = wo * stride_w - pad_w + j * dilation_w;
    scalar_t value = 0;
    if (h >= 0 && h < height && w >= 0 && w < width) {
      value = x[((n * channels + c) * height + h) * width + w]
            * mask[((n * taps + k) * out_h + ho) * out_w + wo];
    }
    columns[index] = value;
  }
}

// grad_mask[n, k, row_start + r, wo] = sum_c grad_columns[n, c, k, r, wo] * x[n, c, pixel]
extern "C" __global__ void masked_columns_grad_mask(
    const long long total, const scalar_t* x, const scalar_t* grad_columns, scalar_t* grad_mask,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w,
    const int row_start, const int band) {
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    const int wo = index % out_w;
    const int r = (index / out_w) % band;
    const int k = (index / ((long long)out_w * band)) % taps;
    const long long n = index / ((long long)out_w * band * taps);
    const int ho = row_start + r;
    const int i = k / kernel_w, j = k % kernel_w;
    const int h = ho * stride_h - pad_h + i * dilation_h;
    const int w = wo * stride_w - pad_w + j * dilation_w;
    scalar_t accumulated = 0;
    if (h >= 0 && h < height && w >= 0 && w < width) {
      for (int c = 0; c < channels; ++c) {
        accumulated += grad_columns[(((n * channels + c) * taps + k) * band + r) * out_w + wo]
                     * x[((n * channels + c) * height + h) * width + w];
      }
    }
    grad_mask[((n * taps + k) * out_h + ho) * out_w + wo] = accumulated;
  }
}

// One thread per input pixel: gather grad_columns * mask over the taps of the band that read
// this pixel (col2im as a gather; no atomics). Adds to grad_x (bands accumulate).
extern "C" __global__ void masked_columns_grad_x(
    const long long total, const scalar_t* grad_columns, const scalar_t* mask, scalar_t* grad_x,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w,
    const int row_start, const int band) {
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    const int w = index % width;
    const int h = (index / width) % height;
    const int c = (index / ((long long)width * height)) % channels;
    const long long n = index / ((long long)width * height * channels);
    scalar_t accumulated = 0;
    for (int k = 0; k < taps; ++k) {
      const int i = k / kernel_w, j = k % kernel_w;
      const int rh = h + pad_h - i * dilation_h, rw = w + pad_w - j * dilation_w;
      if (rh < 0 || rw < 0 || rh % stride_h != 0 || rw % stride_w != 0) continue;
      const int ho = rh / stride_h, wo = rw / stride_w;
      if (ho < row_start || ho >= row_start + band || wo >= out_w) continue;
      const int r = ho - row_start;
      accumulated += grad_columns[(((n * channels + c) * taps + k) * band + r) * out_w + wo]
                   * mask[((n * taps + k) * out_h + ho) * out_w + wo];
    }
    grad_x[index] += accumulated;
  }
}
"""


def _kernel_geometry_args(x, mask, geometry, row_start, band):
    _, channels, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    return (channels, height, width, out_h, out_w, *geometry.kernel, *geometry.pad,
            *geometry.stride, *geometry.dilation, row_start, band)


def _masked_columns_cuda(x, mask, geometry, row_start, row_end, columns):
    _cuda.launch("masked_columns", _CUDA_SOURCE, columns.numel(),
                 (x, mask, columns, *_kernel_geometry_args(x, mask, geometry, row_start,
                                                           row_end - row_start)), like=x)
    return columns


def _masked_conv_forward_cuda(x, mask, weight, bias, geometry, group):
    batch, channels, _, _ = x.shape
    out_h, out_w = mask.shape[2:]
    num_output = weight.shape[0]
    taps = geometry.taps
    weight_groups = weight.reshape(group, num_output // group, channels // group * taps)
    out = x.new_empty((batch, num_output, out_h, out_w))
    rows = band_rows(batch, channels, taps, out_w, x.element_size(), CUDA_BAND_BYTES)
    buffer = x.new_empty(batch * channels * taps * min(rows, out_h) * out_w)
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band = row_end - row_start
        columns = buffer[:batch * channels * taps * band * out_w]
        _masked_columns_cuda(x, mask, geometry, row_start, row_end, columns)
        columns = columns.view(batch, group, channels // group * taps, band * out_w)
        band_out = torch.matmul(weight_groups, columns)
        out[:, :, row_start:row_end] = band_out.reshape(batch, num_output, band, out_w)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def _masked_conv_backward_cuda(x, mask, weight, grad_out, geometry, group, needs):
    need_x, need_mask, need_weight, need_bias = needs
    batch, channels, _, _ = x.shape
    out_h, out_w = mask.shape[2:]
    num_output = weight.shape[0]
    taps = geometry.taps
    group_columns = channels // group * taps
    weight_groups = weight.reshape(group, num_output // group, group_columns)
    grad_x = torch.zeros_like(x) if need_x else None
    grad_mask = torch.empty_like(mask) if need_mask else None
    grad_weight = torch.zeros_like(weight_groups) if need_weight else None
    rows = band_rows(batch, channels, taps, out_w, x.element_size(), CUDA_BAND_BYTES)
    buffer = x.new_empty(batch * channels * taps * min(rows, out_h) * out_w)
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band = row_end - row_start
        grad_band = grad_out[:, :, row_start:row_end].reshape(
            batch, group, num_output // group, band * out_w)
        if need_weight:
            columns = buffer[:batch * channels * taps * band * out_w]
            _masked_columns_cuda(x, mask, geometry, row_start, row_end, columns)
            columns = columns.view(batch, group, group_columns, band * out_w)
            grad_weight += torch.matmul(grad_band, columns.transpose(-1, -2)).sum(0)
        if need_x or need_mask:
            grad_columns = torch.matmul(weight_groups.transpose(-1, -2), grad_band).contiguous()
            band_args = _kernel_geometry_args(x, mask, geometry, row_start, band)
            if need_mask:
                _cuda.launch("masked_columns_grad_mask", _CUDA_SOURCE, batch * taps * band * out_w,
                             (x, grad_columns, grad_mask, *band_args), like=x)
            if need_x:
                _cuda.launch("masked_columns_grad_x", _CUDA_SOURCE, x.numel(),
                             (grad_columns, mask, grad_x, *band_args), like=x)
    grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
    if need_weight:
        grad_weight = grad_weight.reshape(weight.shape)
    return grad_x, grad_mask, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------

class MaskedConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, weight, bias, geometry, group):
        x, mask, weight = x.contiguous(), mask.contiguous(), weight.contiguous()
        forward_impl = _masked_conv_forward_cuda if x.is_cuda else _masked_conv_forward_cpu
        out = forward_impl(x, mask, weight, bias, geometry, group)
        ctx.save_for_backward(x, mask, weight)
        ctx.geometry, ctx.group, ctx.has_bias = geometry, group, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, mask, weight = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                 ctx.has_bias and ctx.needs_input_grad[3])
        if not any(needs):
            return None, None, None, None, None, None
        backward_impl = _masked_conv_backward_cuda if x.is_cuda else _masked_conv_backward_cpu
        grad_x, grad_mask, grad_weight, grad_bias = backward_impl(
            x, mask, weight, grad_out.contiguous(), ctx.geometry, ctx.group, needs)
        return grad_x, grad_mask, grad_weight, grad_bias, None, None


def segaware_mask(emb, lam, geometry, norm="L1"):
    """exp(-|lam * Im2dist(emb)|), (N, K, Ho, Wo): the released configs' Im2dist -> Scale ->
    AbsVal -> Exp(scale -1) chain, differentiable in emb and lam with the original's rules."""
    distance = im2dist(emb, geometry.kernel, geometry.pad, geometry.stride, geometry.dilation,
                       norm=norm)
    return torch.exp(-torch.abs(distance * lam))


def masked_conv2d(x, weight, bias=None, *, emb=None, lam=None, mask=None, kernel_size=None,
                  pad=0, stride=1, dilation=1, group=1, norm="L1"):
    """Segmentation-aware convolution without the (N, C*K, Ho*Wo) intermediates.

    y[n, o, p] = bias[o] + sum_{c, k} weight[o, c, k] * x[n, c, p + offset_k] * mask[n, k, p]

    Args:
        x: (N, C, H, W) float32/float64.
        weight: (O, C/group, kh, kw); bias: (O,) or None.
        emb, lam: embedding (N, E, H', W') and scale (0-dim tensor or float); the mask is then
            exp(-|lam * Im2dist_norm(emb)|) with the convolution's geometry.
        mask: alternatively a precomputed (N, kh*kw, Ho, Wo) mask (exactly one of emb / mask).
        kernel_size: int or pair; defaults to weight's (must match it when given).
        pad, stride, dilation: int or (h, w) pairs. group: channel groups. norm: "L1" or "L2".
    Returns:
        (N, O, Ho, Wo), Ho, Wo by the convolution rule.
    """
    check_image_batch(x, "x", "masked_conv2d")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"masked_conv2d: weight must be a 4-D tensor (O, C/group, kh, kw), got "
                         f"{got}")
    if kernel_size is None:
        kernel_size = tuple(weight.shape[2:])
    geometry = PatchGeometry.of(kernel_size, pad, stride, dilation)
    if tuple(weight.shape[2:]) != geometry.kernel:
        raise ValueError(f"masked_conv2d: weight kernel {tuple(weight.shape[2:])} does not match "
                         f"kernel_size {geometry.kernel}")
    batch, channels, height, width = x.shape
    if group <= 0 or channels % group or weight.shape[0] % group:
        raise ValueError(f"masked_conv2d: group {group} must divide the input channels {channels} "
                         f"and the outputs {weight.shape[0]}")
    if weight.shape[1] * group != channels:
        raise ValueError(f"masked_conv2d: weight has {weight.shape[1]} input channels per group; "
                         f"x has {channels} channels in {group} group(s), expected "
                         f"{channels // group}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"masked_conv2d: bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias), ("mask", mask), ("emb", emb)):
        if tensor is not None and (tensor.dtype != x.dtype or tensor.device != x.device):
            raise ValueError(f"masked_conv2d: {name} must be {x.dtype} on {x.device} like x, got "
                             f"{tensor.dtype} on {tensor.device}")
    out_size = geometry.check_output_size(height, width)
    if (emb is None) == (mask is None):
        raise ValueError("masked_conv2d: give exactly one of emb (with lam) or mask")
    if emb is not None:
        if lam is None:
            raise ValueError("masked_conv2d: emb needs lam (the Scale applied to its distances)")
        check_image_batch(emb, "emb", "masked_conv2d")
        if emb.shape[0] != batch or tuple(emb.shape[2:]) != (height, width):
            raise ValueError(f"masked_conv2d: emb must be (N={batch}, E, {height}, {width}) like "
                             f"x, got {tuple(emb.shape)}")
        mask = segaware_mask(emb, lam, geometry, norm)
    expected_mask = (batch, geometry.taps) + out_size
    if tuple(mask.shape) != expected_mask:
        raise ValueError(f"masked_conv2d: mask must be (N, kh*kw, Ho, Wo) = {expected_mask}, got "
                         f"{tuple(mask.shape)}")
    return MaskedConv2dFunction.apply(x, mask, weight, bias, geometry, group)
