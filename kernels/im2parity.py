"""Im2parity: does each patch neighbour carry the centre's label?

    y[n, k, ho, wo] = 1 if int(label[centre]) == int(label[neighbour_k]) else 0

Labels are truncated toward zero; an out-of-image neighbour counts as label 0. With an
ignore_label, a tap whose centre or neighbour label equals it outputs ignore_label. An output whose
patch centre lies outside the image outputs ignore_label, or 0 when none is set (the original
left that memory unwritten, i.e. whatever the buffer held; 0 is what a fresh buffer holds). With
C > 1 the last channel wins, as in the original (every channel overwrites the same output).
There is no backward (the original aborts there): the labels never receive a gradient and the
output never requires grad.

The op is `torch.ops.segaware.im2parity`; float16 / bfloat16 labels are computed in float32 and
the result cast back.
"""
import torch
from torch import Tensor

from . import _cuda
from .geometry import (ConvGeometry, check_tensor, compute_dtype, no_autocast, pad_input,
                       patch_view, tap_inside, tap_offsets)


def _forward_cpu(labels, geometry, ignore_label):
    batch, channels, height, width = labels.shape
    out_size = geometry.output_size(height, width)
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


def _forward_cuda(labels, geometry, ignore_label, images=0):
    """`images` > 0 numbers the batch's images from there (tests: offsets beyond 2^31)."""
    return _cuda.launch_tap_planes(
        "im2parity_forward", ("im2parity.cu",), labels, geometry,
        (ignore_label is not None, float(ignore_label) if ignore_label is not None else 0.0),
        images)


@torch.library.custom_op("segaware::im2parity", mutates_args=())
@no_autocast
def im2parity_op(labels: Tensor, geometry: list[int], ignore_label: int | None) -> Tensor:
    """labels (N, C, H, W) float32/float64 -> (N, kh*kw, Ho, Wo) of 0/1 (or ignore_label)."""
    geometry = ConvGeometry.from_list(geometry)
    labels = labels.contiguous()
    path = _forward_cuda if labels.is_cuda else _forward_cpu
    return path(labels, geometry, ignore_label)


@im2parity_op.register_fake
def _(labels, geometry, ignore_label):
    geometry = ConvGeometry.from_list(geometry)
    return labels.new_empty((labels.shape[0], geometry.taps,
                             *geometry.output_size(*labels.shape[2:])))


def im2parity(labels, kernel_size, pad=(0, 0), stride=(1, 1), dilation=(1, 1), ignore_label=None):
    """Label agreement between each patch centre and its K = kh*kw neighbours.

    Args:
        labels: (N, C, H, W) floating tensor holding integer labels (the last channel is used);
            N may be 0.
        kernel_size, pad, stride, dilation: int or (h, w) pairs, Caffe convolution geometry.
        ignore_label: int or None; taps touching it (or with the centre outside) output it.
    Returns:
        (N, K, Ho, Wo) of 0/1 (or ignore_label), labels' dtype, never requiring grad.
    """
    check_tensor("im2parity", "labels", labels, dim=4)
    if ignore_label is not None:
        if isinstance(ignore_label, bool) or not isinstance(ignore_label, int) or ignore_label < 0:
            raise ValueError(f"im2parity: ignore_label must be a non-negative int or None, "
                             f"got {ignore_label!r}")
    geometry = ConvGeometry.of(kernel_size, pad, stride, dilation)
    geometry.check_output_size(labels.shape[2], labels.shape[3], "im2parity")
    # labels carry no gradient in the original: the op sees them detached
    out = im2parity_op(labels.detach().to(compute_dtype(labels.dtype)), geometry.as_list(),
                       ignore_label)
    return out.to(labels.dtype)
