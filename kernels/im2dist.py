"""Im2dist: per-tap distance between a patch centre and each neighbour (SEMANTICS §2.1).

    y[n, k, ho, wo] = sum_c phi(x[n, c, centre] - x[n, c, neighbour_k])

with phi(d) = |d| (L1) or 0.5 d² (L2, the default: half the *squared* distance). Quirks kept:
an out-of-image neighbour gives 0 (BIG with remove_bounds), the centre tap gives BIG with
remove_center, and an output whose patch centre lies outside the image is 0 for every tap.

Backward: L2 is the exact derivative; L1 follows the original's GPU rule sign(0) = 0 (a zero
difference, the centre tap and out-of-image neighbours give no gradient).

This module also holds the patch geometry shared by the other segmentation-aware kernels.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _cuda

# FLT_MAX / 100 rounded to float32, the value the original writes for removed taps
BIG = float(torch.tensor(torch.finfo(torch.float32).max / 100, dtype=torch.float32))

NORMS = ("L1", "L2")


def as_pair(value, name):
    """An int or a 2-sequence as (h, w) ints."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    return pair


@dataclass(frozen=True)
class PatchGeometry:
    """Kernel/pad/stride/dilation of a sliding patch, as (h, w) pairs (Caffe's im2col rules)."""
    kernel: tuple
    pad: tuple = (0, 0)
    stride: tuple = (1, 1)
    dilation: tuple = (1, 1)

    @classmethod
    def of(cls, kernel_size, pad=(0, 0), stride=(1, 1), dilation=(1, 1)):
        geometry = cls(as_pair(kernel_size, "kernel_size"), as_pair(pad, "pad"),
                       as_pair(stride, "stride"), as_pair(dilation, "dilation"))
        geometry.validate()
        return geometry

    def validate(self):
        if min(self.kernel) <= 0:
            raise ValueError(f"kernel_size must be > 0, got {self.kernel}")
        if min(self.pad) < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        if min(self.stride) <= 0:
            raise ValueError(f"stride must be > 0, got {self.stride}")
        if min(self.dilation) <= 0:
            raise ValueError(f"dilation must be > 0, got {self.dilation}")

    @property
    def taps(self):
        return self.kernel[0] * self.kernel[1]

    @property
    def centre_tap(self):
        """(i, j) of the tap the original treats as the centre: kh div 2, kw div 2."""
        return (self.kernel[0] // 2, self.kernel[1] // 2)

    @property
    def centre_offset(self):
        """Padded-coordinate offsets (as in tap_offsets) of the centre tap."""
        return (self.centre_tap[0] * self.dilation[0], self.centre_tap[1] * self.dilation[1])

    def output_size(self, height, width):
        """floor((H + 2p - (d(k-1)+1)) / s) + 1 per spatial dim."""
        return tuple((size + 2 * p - (d * (k - 1) + 1)) // s + 1 for size, k, p, s, d in zip(
            (height, width), self.kernel, self.pad, self.stride, self.dilation))

    def check_output_size(self, height, width):
        out_h, out_w = self.output_size(height, width)
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"input {height}x{width} is too small for kernel {self.kernel}, pad "
                             f"{self.pad}, dilation {self.dilation}: output would be "
                             f"{out_h}x{out_w}")
        return out_h, out_w


def tap_offsets(geometry):
    """[(i, j, offset_h, offset_w)] in tap order k = i*kw + j; offsets are in padded coordinates
    (pixel row of tap i at output row ho is ho*stride_h + offset_h - pad_h)."""
    kh, kw = geometry.kernel
    dh, dw = geometry.dilation
    return [(i, j, i * dh, j * dw) for i in range(kh) for j in range(kw)]


def axis_inside(size, out_size, kernel, pad, stride, dilation, device):
    """Bool (kernel, out_size): tap row i at output row o lies inside [0, size)."""
    position = (torch.arange(out_size, device=device)[None, :] * stride - pad
                + torch.arange(kernel, device=device)[:, None] * dilation)
    return (position >= 0) & (position < size)


def inside_masks(geometry, height, width, device):
    """(row_inside (kh, Ho), col_inside (kw, Wo)): where tap rows/columns fall inside the image."""
    out_h, out_w = geometry.output_size(height, width)
    rows = axis_inside(height, out_h, geometry.kernel[0], geometry.pad[0], geometry.stride[0],
                       geometry.dilation[0], device)
    cols = axis_inside(width, out_w, geometry.kernel[1], geometry.pad[1], geometry.stride[1],
                       geometry.dilation[1], device)
    return rows, cols


def tap_inside(geometry, height, width, device):
    """Bool (kh, kw, Ho, Wo): tap (i, j) of output (ho, wo) lies inside the H x W image
    (tap_inside[centre_tap] says where the patch centre is inside)."""
    rows, cols = inside_masks(geometry, height, width, device)
    return rows[:, None, :, None] & cols[None, :, None, :]


def pad_input(x, geometry):
    """Zero-pad the two spatial dims by the geometry's pad (every tap view then stays in range)."""
    pad_h, pad_w = geometry.pad
    return F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x


def patch_view(padded, offset_h, offset_w, out_size, stride):
    """Strided view of a padded (..., Hp, Wp) tensor: element (ho, wo) is the pixel at padded
    (ho*stride_h + offset_h, wo*stride_w + offset_w)."""
    out_h, out_w = out_size
    stride_h, stride_w = stride
    return padded[..., offset_h:offset_h + (out_h - 1) * stride_h + 1:stride_h,
                  offset_w:offset_w + (out_w - 1) * stride_w + 1:stride_w]


# ---------------------------------------------------------------------------------------------
# CPU (vectorised torch; the loop runs over the K taps only)

def _im2dist_forward_cpu(x, geometry, norm, remove_center, remove_bounds):
    batch, _, height, width = x.shape
    out_size = geometry.output_size(height, width)
    padded = pad_input(x, geometry)
    inside = tap_inside(geometry, height, width, x.device)
    centre_inside = inside[geometry.centre_tap]
    centre = patch_view(padded, *geometry.centre_offset, out_size, geometry.stride)
    out = x.new_empty((batch, geometry.taps) + out_size)
    zero = x.new_zeros(())
    # value of a tap that computes no distance: 0 when the centre is outside the image, else
    # BIG for an out-of-image neighbour with remove_bounds, else 0
    outside_fill = torch.where(centre_inside, x.new_tensor(BIG if remove_bounds else 0.0), zero)
    for k, (i, j, offset_h, offset_w) in enumerate(tap_offsets(geometry)):
        if remove_center and (i, j) == geometry.centre_tap:
            out[:, k] = torch.where(centre_inside, x.new_tensor(BIG), zero)
            continue
        difference = centre - patch_view(padded, offset_h, offset_w, out_size, geometry.stride)
        # in place: the difference is a fresh temporary
        distance = (difference.abs_().sum(1) if norm == "L1"
                    else difference.square_().sum(1).mul_(0.5))
        out[:, k] = torch.where(centre_inside & inside[i, j], distance, outside_fill)
    return out


def _im2dist_backward_cpu(x, grad_out, geometry, norm):
    _, _, height, width = x.shape
    out_size = geometry.output_size(height, width)
    padded = pad_input(x, geometry)
    grad_padded = torch.zeros_like(padded)
    inside = tap_inside(geometry, height, width, x.device)
    centre_inside = inside[geometry.centre_tap]
    centre = patch_view(padded, *geometry.centre_offset, out_size, geometry.stride)
    grad_centre = torch.zeros_like(centre)
    for k, (i, j, offset_h, offset_w) in enumerate(tap_offsets(geometry)):
        if (i, j) == geometry.centre_tap:
            continue  # zero difference (or a removed tap): no gradient on either path
        neighbour = patch_view(padded, offset_h, offset_w, out_size, geometry.stride)
        difference = centre - neighbour
        # sign(0) = 0 (the original's GPU rule) for L1; the exact derivative for L2
        contribution = difference.sign_() if norm == "L1" else difference
        contribution *= (grad_out[:, k] * (centre_inside & inside[i, j])).unsqueeze(1)
        grad_centre += contribution
        patch_view(grad_padded, offset_h, offset_w, out_size, geometry.stride).sub_(contribution)
    patch_view(grad_padded, *geometry.centre_offset, out_size, geometry.stride).add_(grad_centre)
    pad_h, pad_w = geometry.pad
    return grad_padded[:, :, pad_h:pad_h + height, pad_w:pad_w + width]


# ---------------------------------------------------------------------------------------------
# CUDA (CuPy). Same index decomposition as the CPU loops; backward gathers (no atomics).

_CUDA_SOURCE = _cuda.GRID_STRIDE_LOOP + _cuda.WINDOW_TAP + r"""
extern "C" __global__ void im2dist_forward(
    const long long total, const scalar_t* x, scalar_t* out,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w,
    const int norm_l1, const int remove_center, const int remove_bounds, const scalar_t big) {
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    WINDOW_TAP(index)
    scalar_t value = 0;
    if (ch < 0 || ch >= height || cw < 0 || cw >= width) {
      value = 0;
    } else if (remove_center && i == centre_i && j == centre_j) {
      value = big;
    } else if (nh >= 0 && nh < height && nw >= 0 && nw < width) {
      const scalar_t* image = x + n * channels * height * width;
      for (int c = 0; c < channels; ++c) {
        const scalar_t difference = image[((long long)c * height + ch) * width + cw]
                                  - image[((long long)c * height + nh) * width + nw];
        value += norm_l1 ? fabs(difference) : (scalar_t)0.5 * difference * difference;
      }
    } else {
      value = remove_bounds ? big : (scalar_t)0;
    }
    out[index] = value;
  }
}

// One thread per input element: gather every (tap, output) pair that uses this pixel as the
// patch centre (+coefficient) or as the neighbour of tap k (-coefficient).
extern "C" __global__ void im2dist_backward(
    const long long total, const scalar_t* x, const scalar_t* grad_out, scalar_t* grad_x,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w,
    const int norm_l1) {
  const int taps = kernel_h * kernel_w;
  const int centre_i = kernel_h / 2, centre_j = kernel_w / 2;
  GRID_STRIDE_LOOP(index, total) {
    const int w = index % width;
    const int h = (index / width) % height;
    const int c = (index / ((long long)width * height)) % channels;
    const long long n = index / ((long long)width * height * channels);
    const scalar_t* plane = x + (n * channels + c) * height * width;
    const scalar_t* grad_image = grad_out + n * taps * out_h * out_w;
    const scalar_t value = plane[h * width + w];
    scalar_t accumulated = 0;
    // this pixel as the centre of output (ho, wo)
    const int centre_rh = h + pad_h - centre_i * dilation_h;
    const int centre_rw = w + pad_w - centre_j * dilation_w;
    if (centre_rh >= 0 && centre_rw >= 0 && centre_rh % stride_h == 0 && centre_rw % stride_w == 0
        && centre_rh / stride_h < out_h && centre_rw / stride_w < out_w) {
      const int ho = centre_rh / stride_h, wo = centre_rw / stride_w;
      for (int k = 0; k < taps; ++k) {
        const int i = k / kernel_w, j = k % kernel_w;
        if (i == centre_i && j == centre_j) continue;
        const int nh = ho * stride_h - pad_h + i * dilation_h;
        const int nw = wo * stride_w - pad_w + j * dilation_w;
        if (nh < 0 || nh >= height || nw < 0 || nw >= width) continue;
        const scalar_t difference = value - plane[nh * width + nw];
        const scalar_t coefficient = norm_l1
            ? (scalar_t)((difference > 0) - (difference < 0)) : difference;
        accumulated += coefficient * grad_image[((long long)k * out_h + ho) * out_w + wo];
      }
    }
    // this pixel as the neighbour of tap k at output (ho, wo)
    for (int k = 0; k < taps; ++k) {
      const int i = k / kernel_w, j = k % kernel_w;
      if (i == centre_i && j == centre_j) continue;
      const int rh = h + pad_h - i * dilation_h, rw = w + pad_w - j * dilation_w;
      if (rh < 0 || rw < 0 || rh % stride_h != 0 || rw % stride_w != 0) continue;
      const int ho = rh / stride_h, wo = rw / stride_w;
      if (ho >= out_h || wo >= out_w) continue;
      const int ch = ho * stride_h - pad_h + centre_i * dilation_h;
      const int cw = wo * stride_w - pad_w + centre_j * dilation_w;
      if (ch < 0 || ch >= height || cw < 0 || cw >= width) continue;
      const scalar_t difference = plane[ch * width + cw] - value;
      const scalar_t coefficient = norm_l1
          ? (scalar_t)((difference > 0) - (difference < 0)) : difference;
      accumulated -= coefficient * grad_image[((long long)k * out_h + ho) * out_w + wo];
    }
    grad_x[index] = accumulated;
  }
}
"""


def _geometry_args(geometry):
    return (*geometry.kernel, *geometry.pad, *geometry.stride, *geometry.dilation)


def _im2dist_forward_cuda(x, geometry, norm, remove_center, remove_bounds):
    batch, channels, height, width = x.shape
    out_size = geometry.output_size(height, width)
    out = x.new_empty((batch, geometry.taps) + out_size)
    _cuda.launch("im2dist_forward", _CUDA_SOURCE, out.numel(),
                 (x, out, channels, height, width, *out_size, *_geometry_args(geometry),
                  norm == "L1", remove_center, remove_bounds, BIG), like=x)
    return out


def _im2dist_backward_cuda(x, grad_out, geometry, norm):
    _, channels, height, width = x.shape
    out_size = geometry.output_size(height, width)
    grad_x = torch.empty_like(x)
    _cuda.launch("im2dist_backward", _CUDA_SOURCE, x.numel(),
                 (x, grad_out.contiguous(), grad_x, channels, height, width, *out_size,
                  *_geometry_args(geometry), norm == "L1"), like=x)
    return grad_x


# ---------------------------------------------------------------------------------------------

class Im2distFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, geometry, norm, remove_center, remove_bounds):
        x = x.contiguous()
        if x.is_cuda:
            out = _im2dist_forward_cuda(x, geometry, norm, remove_center, remove_bounds)
        else:
            out = _im2dist_forward_cpu(x, geometry, norm, remove_center, remove_bounds)
        ctx.save_for_backward(x)
        ctx.geometry, ctx.norm = geometry, norm
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (x,) = ctx.saved_tensors
        if x.is_cuda:
            grad_x = _im2dist_backward_cuda(x, grad_out, ctx.geometry, ctx.norm)
        else:
            grad_x = _im2dist_backward_cpu(x, grad_out, ctx.geometry, ctx.norm)
        return grad_x, None, None, None, None


def check_image_batch(x, name, op):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {x.dtype}")


def im2dist(x, kernel_size, pad=(0, 0), stride=(1, 1), dilation=(1, 1), norm="L2",
            remove_center=False, remove_bounds=False):
    """Distances between each patch centre and its K = kh*kw neighbours.

    Args:
        x: (N, C, H, W) float32/float64 (the embedding).
        kernel_size, pad, stride, dilation: int or (h, w) pairs, Caffe convolution geometry.
        norm: "L1" (sum of |d|) or "L2" (0.5 * sum of d², the original's default).
        remove_center: the centre tap becomes BIG (= FLT_MAX/100).
        remove_bounds: out-of-image neighbours become BIG instead of 0.
    Returns:
        (N, K, Ho, Wo), tap k = i*kw + j; outputs whose centre is outside the image are 0.
    """
    check_image_batch(x, "x", "im2dist")
    if norm not in NORMS:
        raise ValueError(f"im2dist: norm must be one of {NORMS}, got {norm!r}")
    geometry = PatchGeometry.of(kernel_size, pad, stride, dilation)
    geometry.check_output_size(x.shape[2], x.shape[3])
    return Im2distFunction.apply(x, geometry, norm, bool(remove_center), bool(remove_bounds))
