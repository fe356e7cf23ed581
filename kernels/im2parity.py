"""Im2parity: does each patch neighbour carry the centre's label? (SEMANTICS §2.2)

    y[n, k, ho, wo] = 1 if int(label[centre]) == int(label[neighbour_k]) else 0

Labels are truncated toward zero; an out-of-image neighbour counts as label 0. With an
ignore_label, a tap whose centre or neighbour label equals it outputs ignore_label. An output whose
patch centre lies outside the image outputs ignore_label, or 0 when none is set (decision 3: the
original wrote uninitialised memory there). With C > 1 the last channel wins, as in the original.
There is no backward (the original aborts); the output never requires grad.
"""
import torch
from torch.autograd.function import once_differentiable

from . import _cuda
from .im2dist import (PatchGeometry, check_image_batch, pad_input, patch_view, tap_inside,
                      tap_offsets)


def _im2parity_forward_cpu(labels, geometry, ignore_label):
    batch, channels, height, width = labels.shape
    out_size = geometry.output_size(height, width)
    # every channel overwrites the same output in the original, so only the last one counts
    padded = pad_input(torch.trunc(labels[:, channels - 1]), geometry)
    centre_inside = tap_inside(geometry, height, width, labels.device)[geometry.centre_tap]
    centre = patch_view(padded, *geometry.centre_offset, out_size, geometry.stride)
    fill_value = float(ignore_label) if ignore_label is not None else 0.0
    out = labels.new_empty((batch, geometry.taps) + out_size)
    for k, (_, _, offset_h, offset_w) in enumerate(tap_offsets(geometry)):
        # the zero padding already makes an out-of-image neighbour label 0
        neighbour = patch_view(padded, offset_h, offset_w, out_size, geometry.stride)
        parity = (neighbour == centre).to(labels.dtype)
        if ignore_label is not None:
            ignored = (neighbour == ignore_label) | (centre == ignore_label)
            parity = torch.where(ignored, parity.new_tensor(fill_value), parity)
        out[:, k] = parity
    return torch.where(centre_inside, out, out.new_tensor(fill_value))


_CUDA_SOURCE = _cuda.GRID_STRIDE_LOOP + _cuda.WINDOW_TAP + r"""
extern "C" __global__ void im2parity_forward(
    const long long total, const scalar_t* labels, scalar_t* out,
    const int channels, const int height, const int width, const int out_h, const int out_w,
    const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
    const int stride_h, const int stride_w, const int dilation_h, const int dilation_w,
    const int has_ignore, const scalar_t ignore_label) {
  const int taps = kernel_h * kernel_w;
  GRID_STRIDE_LOOP(index, total) {
    WINDOW_TAP(index)
    const scalar_t fill_value = has_ignore ? ignore_label : (scalar_t)0;
    scalar_t value = fill_value;
    if (ch >= 0 && ch < height && cw >= 0 && cw < width) {
      // only the last channel counts (the original overwrites the output per channel)
      const scalar_t* plane = labels + (n * channels + channels - 1) * height * width;
      const scalar_t centre_label = trunc(plane[ch * width + cw]);
      const scalar_t neighbour_label = (nh >= 0 && nh < height && nw >= 0 && nw < width)
          ? trunc(plane[nh * width + nw]) : (scalar_t)0;
      if (has_ignore && (neighbour_label == ignore_label
                         || centre_label == ignore_label)) {
        value = fill_value;
      } else {
        value = neighbour_label == centre_label ? (scalar_t)1 : (scalar_t)0;
      }
    }
    out[index] = value;
  }
}
"""


def _im2parity_forward_cuda(labels, geometry, ignore_label):
    batch, channels, height, width = labels.shape
    out_size = geometry.output_size(height, width)
    out = labels.new_empty((batch, geometry.taps) + out_size)
    _cuda.launch("im2parity_forward", _CUDA_SOURCE, out.numel(),
                 (labels, out, channels, height, width, *out_size, *geometry.kernel, *geometry.pad,
                  *geometry.stride, *geometry.dilation, ignore_label is not None,
                  float(ignore_label) if ignore_label is not None else 0.0), like=labels)
    return out


class Im2parityFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, labels, geometry, ignore_label):
        labels = labels.contiguous()
        if labels.is_cuda:
            out = _im2parity_forward_cuda(labels, geometry, ignore_label)
        else:
            out = _im2parity_forward_cpu(labels, geometry, ignore_label)
        ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # unreachable (the output is non-differentiable); labels get no gradient
        return None, None, None


def im2parity(labels, kernel_size, pad=(0, 0), stride=(1, 1), dilation=(1, 1), ignore_label=None):
    """Label agreement between each patch centre and its K = kh*kw neighbours.

    Args:
        labels: (N, C, H, W) float32/float64 holding integer labels (the last channel is used).
        kernel_size, pad, stride, dilation: int or (h, w) pairs, Caffe convolution geometry.
        ignore_label: int or None; taps touching it (or with the centre outside) output it.
    Returns:
        (N, K, Ho, Wo) of 0/1 (or ignore_label), same dtype as labels, never requiring grad.
    """
    check_image_batch(labels, "labels", "im2parity")
    if ignore_label is not None:
        if isinstance(ignore_label, bool) or not isinstance(ignore_label, int) or ignore_label < 0:
            raise ValueError(f"im2parity: ignore_label must be a non-negative int or None, "
                             f"got {ignore_label!r}")
    geometry = PatchGeometry.of(kernel_size, pad, stride, dilation)
    geometry.check_output_size(labels.shape[2], labels.shape[3])
    return Im2parityFunction.apply(labels, geometry, ignore_label)
