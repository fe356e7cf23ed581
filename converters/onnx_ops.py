"""The segmentation-aware ops in standard operators only, for ONNX export.

Each function here takes the arguments of its twin in `segaware_caffe.kernels` (the exporter
swaps one for the other) and computes the same forward with torch operations that the ONNX
exporter maps to standard ONNX ops (Pad, Slice, Conv, MatMul, Mul, ReduceSum, Softmax, Where,
...), so a traced net needs no custom operator. They are forward-only references for export:
no backward rules, no CUDA kernels, no half-precision handling.

Two ways of reading a patch:
* `tap_slices`: tap k of every output pixel as one strided Slice of the zero-padded input. Exact
  on every backend (a copy) and lean: one (N, C, Ho, Wo) tensor per tap. Used where values are
  compared or subtracted (distances, labels, the CRF messages, whose kernels can have 169 taps).
* `patch_columns`: all taps at once, (N, C, K, Ho, Wo), as one fixed one-hot grouped Conv (the
  im2col of the original's unfused layers). Used by the masked convolution, whose MatMul reads
  the columns anyway. One-hot products are exact in float32; a backend that runs convolutions in
  TF32 rounds the columns as it rounds the MatMul's operands.

Slices end at a negative offset from the padded input's end, and the masks of in-image taps are
computed from a ones-image of the input's size, so the graph follows the input's shape where
the rest of the net does.
"""
import numpy as np
import torch
import torch.nn.functional as F

from segaware_caffe.kernels.domain_transform import domain_transform_constants
from segaware_caffe.kernels.geometry import ConvGeometry, tap_offsets
from segaware_caffe.kernels.im2dist import BIG, NORMS

__all__ = ["average_pool2d", "dist_loss", "domain_transform", "im2dist", "im2parity",
           "masked_conv2d", "message", "message_attention", "norm_conv", "normconv_meanfield",
           "nosp_conv_meanfield", "patch_columns", "tap_slices", "trunc", "zero_first_element"]


# ---------------------------------------------------------------------------------- patches
def _padded(x, geometry):
    pad_h, pad_w = geometry.pad
    return F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x


def tap_slices(x, geometry):
    """[tap k of x for every output pixel] in tap order k = i*kw + j, each (N, C, Ho, Wo),
    zero outside the image (Caffe's im2col rule)."""
    padded = _padded(x, geometry)
    (kh, kw), (dh, dw), (sh, sw) = geometry.kernel, geometry.dilation, geometry.stride
    taps = []
    for _, _, offset_h, offset_w in tap_offsets(geometry):
        # the window of the last tap row ends (kh-1)*dh - offset_h before the padded end
        end_h, end_w = offset_h - (kh - 1) * dh, offset_w - (kw - 1) * dw
        taps.append(padded[..., offset_h:end_h or None:sh, offset_w:end_w or None:sw])
    return taps


def patch_columns(x, geometry):
    """(N, C, K, Ho, Wo): every tap of every channel, by one grouped convolution with fixed
    one-hot filters (output channel c*K + k copies channel c at tap k)."""
    kh, kw = geometry.kernel
    taps = kh * kw
    channels = int(x.shape[1])
    one_hot = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(taps, 1, kh, kw)
    columns = F.conv2d(x, one_hot.repeat(channels, 1, 1, 1), None, geometry.stride, geometry.pad,
                       geometry.dilation, groups=channels)
    return columns.reshape(x.shape[0], channels, taps, columns.shape[2], columns.shape[3])


def _inside(x, geometry):
    """[bool (1, 1, Ho, Wo): tap k lies inside the H x W image], in tap order."""
    ones = x.new_ones((1, 1, x.shape[2], x.shape[3]))
    return [tap > 0.5 for tap in tap_slices(ones, geometry)]


def _centre_index(geometry):
    i, j = geometry.centre_tap
    return i * geometry.kernel[1] + j


def trunc(x):
    """Rounding toward zero (ONNX has no Trunc operator)."""
    return torch.where(x < 0, torch.ceil(x), torch.floor(x))


# ------------------------------------------------------------------------------ the ops
def im2dist(x, kernel_size, pad=(0, 0), stride=(1, 1), dilation=(1, 1), norm="L2",
            remove_center=False, remove_bounds=False):
    """kernels.im2dist: (N, C, H, W) -> (N, K, Ho, Wo), phi(centre - neighbour) summed over the
    channels, phi = |d| (L1) or 0.5 d² (L2); a removed tap is BIG (FLT_MAX/100), an out-of-image
    neighbour 0 (BIG with remove_bounds), every tap of a patch whose centre is outside 0."""
    if norm not in NORMS:
        raise ValueError(f"im2dist: norm must be one of {NORMS}, got {norm!r}")
    geometry = ConvGeometry.of(kernel_size, pad, stride, dilation)
    geometry.check_output_size(x.shape[2], x.shape[3], "im2dist")
    taps, inside = tap_slices(x, geometry), _inside(x, geometry)
    centre = _centre_index(geometry)
    big, zero = x.new_tensor(BIG), x.new_zeros(())
    outputs = []
    for k, (neighbour, neighbour_inside) in enumerate(zip(taps, inside)):
        removed = remove_center and k == centre
        if removed:
            outputs.append(torch.where(inside[centre], big, zero).expand_as(neighbour[:, :1]))
            continue
        difference = taps[centre] - neighbour
        phi = difference.abs() if norm == "L1" else difference * difference
        distance = phi.sum(1, keepdim=True)
        if norm == "L2":
            distance = distance * 0.5
        outside = torch.where(inside[centre], big, zero) if remove_bounds else zero
        outputs.append(torch.where(inside[centre] & neighbour_inside, distance, outside))
    return torch.cat(outputs, dim=1)


def im2parity(labels, kernel_size, pad=(0, 0), stride=(1, 1), dilation=(1, 1), ignore_label=None):
    """kernels.im2parity: 1 where the neighbour's label (truncated, 0 outside the image, the last
    channel) equals the centre's, else 0; ignore_label where either is ignore_label or the patch
    centre is outside the image (0 there when no ignore_label is set)."""
    geometry = ConvGeometry.of(kernel_size, pad, stride, dilation)
    geometry.check_output_size(labels.shape[2], labels.shape[3], "im2parity")
    last = labels.shape[1] - 1
    taps = tap_slices(trunc(labels[:, last:last + 1]), geometry)
    centre_tap = _centre_index(geometry)
    centre = taps[centre_tap]
    centre_inside = _inside(labels, geometry)[centre_tap]
    fill = labels.new_tensor(float(ignore_label) if ignore_label is not None else 0.0)
    outputs = []
    for neighbour in taps:
        parity = (neighbour == centre).to(labels.dtype)
        if ignore_label is not None:
            ignored = (neighbour == ignore_label) | (centre == ignore_label)
            parity = torch.where(ignored, fill, parity)
        outputs.append(torch.where(centre_inside, parity, fill))
    return torch.cat(outputs, dim=1)


def dist_loss(dist, parity, alpha, beta, ignore_label=None):
    """kernels.dist_loss: sum of the hinge margins over every element / the element count."""
    parity = trunc(parity.to(dist.dtype)).reshape(dist.shape)
    same = parity != 0
    margin = torch.where(same, torch.clamp(dist - alpha, min=0), torch.clamp(beta - dist, min=0))
    if ignore_label is not None:
        margin = torch.where(parity == ignore_label, margin.new_zeros(()), margin)
    return margin.sum() / dist.numel() if dist.numel() else margin.sum() * float("nan")


def masked_conv2d(x, weight, bias=None, *, emb=None, lam=None, mask=None, kernel_size=None,
                  pad=0, stride=1, dilation=1, group=1, norm="L1"):
    """kernels.masked_conv2d: y[n, o, p] = bias[o] + sum_{c,k} W[o, c, k] x[n, c, p + offset_k]
    mask[n, k, p], as patch columns (one-hot Conv), a mask Mul and one MatMul per group."""
    if kernel_size is None:
        kernel_size = tuple(weight.shape[2:])
    geometry = ConvGeometry.of(kernel_size, pad, stride, dilation)
    if (emb is None) == (mask is None):
        raise ValueError("masked_conv2d: give exactly one of emb (with lam) or mask")
    if emb is not None:
        distance = im2dist(emb, geometry.kernel, geometry.pad, geometry.stride, geometry.dilation,
                           norm=norm)
        mask = torch.exp(-torch.abs(distance * lam))
    columns = patch_columns(x, geometry) * mask.unsqueeze(1)     # (N, C, K, Ho, Wo)
    batch, channels, taps, out_h, out_w = columns.shape
    outputs = weight.shape[0]
    columns = columns.reshape(batch, group, channels // group * taps, out_h * out_w)
    grouped = weight.reshape(group, outputs // group, channels // group * taps)
    out = torch.matmul(grouped, columns).reshape(batch, outputs, out_h, out_w)
    return out + bias.reshape(1, outputs, 1, 1) if bias is not None else out


def norm_conv(x, emb, weight, bias=None, scale=None, *, kernel_size, pad=0, stride=1, dilation=1,
              group=1, norm="L2", remove_center=False, remove_bounds=False, scale_term=True):
    """kernels.norm_conv.norm_conv: a convolution whose taps are weighted by
    softmax_k(-scale * im2dist(emb)) (softmax_k(+D) without scale_term)."""
    geometry = ConvGeometry.of(kernel_size, pad, stride, dilation)
    dist = im2dist(emb, geometry.kernel, geometry.pad, geometry.stride, geometry.dilation,
                   norm=norm, remove_center=remove_center, remove_bounds=remove_bounds)
    logits = dist * (-scale).reshape(()) if scale_term else dist
    return masked_conv2d(x, weight, bias, mask=torch.softmax(logits, dim=1),
                         kernel_size=geometry.kernel, pad=geometry.pad, stride=geometry.stride,
                         dilation=geometry.dilation, group=group)


# ------------------------------------------------------------------------------ the CRFs
def message_attention(features, spec):
    """kernels.meanfield.message_attention: softmax over the taps of -scale * im2dist_L2(F),
    None for dilation 0 (every tap reads the patch centre)."""
    if spec.dilation == 0:
        return None
    geometry = spec.geometry
    dist = im2dist(features, geometry.kernel, geometry.pad, geometry.stride, geometry.dilation,
                   norm="L2", remove_center=spec.remove_center, remove_bounds=spec.remove_bounds)
    return torch.softmax(dist * (-spec.scale), dim=1)


def message(q, attention, spec):
    """kernels.meanfield.message: sum_k attention[k] * q at tap k, on the geometry's grid (with
    dilation 0, the zero-padded q sampled at the stride)."""
    geometry = spec.geometry
    if attention is None:
        stride_h, stride_w = geometry.stride
        return _padded(q, geometry)[..., ::stride_h, ::stride_w]
    out = None
    for k, tap in enumerate(tap_slices(q, geometry)):
        term = tap * attention[:, k:k + 1]
        out = term if out is None else out + term
    return out


def _as_input_frame(msg, height, width):
    """The first C*H*W values of each image's message, as (N, C, H, W) (the message itself when
    its grid is H x W), as the original's C x C products read it."""
    if tuple(msg.shape[-2:]) == (height, width):
        return msg
    batch, channels = msg.shape[:2]
    return msg.reshape(batch, -1)[:, :channels * height * width].reshape(batch, channels, height,
                                                                          width)


def normconv_meanfield(unary, q0, feat_bilateral, feat_spatial, w_spatial, w_bilateral, compat, *,
                       num_iterations, bilateral, spatial):
    """kernels.meanfield.normconv_meanfield: X_{t+1} = U - compat (W_s S + W_b B) with
    Q = softmax(X_t) over the channels, X_0 = q0; returns X_T."""
    batch, channels, height, width = unary.shape
    w_spatial, w_bilateral, compat = (m.reshape(channels, channels)
                                      for m in (w_spatial, w_bilateral, compat))
    attention_bilateral = message_attention(feat_bilateral, bilateral)
    attention_spatial = message_attention(feat_spatial, spatial)
    plane = height * width
    x = q0
    for _ in range(num_iterations):
        q = torch.softmax(x, dim=1)
        msg_spatial = _as_input_frame(message(q, attention_spatial, spatial), height, width)
        msg_bilateral = _as_input_frame(message(q, attention_bilateral, bilateral), height, width)
        mixed = (torch.matmul(w_spatial, msg_spatial.reshape(batch, channels, plane))
                 + torch.matmul(w_bilateral, msg_bilateral.reshape(batch, channels, plane)))
        x = unary - torch.matmul(compat, mixed).reshape(batch, channels, height, width)
    return x


def nosp_conv_meanfield(unary, q0, features, compat, *, num_iterations, bilateral):
    """The NospConvMeanfield layer's forward (the original's CPU path, which multiplies by the
    compatibility twice and never reads the bilateral weight)."""
    batch, channels, height, width = unary.shape
    compat = compat.reshape(channels, channels)
    attention = message_attention(features, bilateral)
    x = q0
    for _ in range(num_iterations):
        msg = message(torch.softmax(x, dim=1), attention, bilateral)
        msg = msg.reshape(batch, -1)[:, :channels * height * width].reshape(batch, channels, -1)
        x = unary - torch.matmul(compat, torch.matmul(compat, msg)).reshape(unary.shape)
    return x


def zero_first_element(x):
    """Element 0 set to exactly 0 (the original's Net::Forward zeroes element 0 of every net
    output before the layers run; where no layer writes it, the 0 stays)."""
    first = torch.arange(x.numel(), device=x.device).reshape(x.shape) == 0
    return torch.where(first, x.new_zeros(()), x)


# ------------------------------------------------------------------ the domain transform
def _recursion(lines, weights, length, across_ok, reverse):
    """One first-order recursion over `lines` (a list along the scan axis of (N, C, K) tensors):
    y[j] += w * (y[j -+ 1] - y[j]) where the weight's position is inside the image's valid
    extent `length` (N,) and the line position is valid across it, `across_ok` (N, K)."""
    size = len(lines)
    for pos in (range(size - 2, -1, -1) if reverse else range(1, size)):
        prev = pos + 1 if reverse else pos - 1
        at = prev if reverse else pos
        active = ((length > at).unsqueeze(1) & across_ok).unsqueeze(1)     # (N, 1, K)
        current = lines[pos]
        step = weights[at].unsqueeze(1) * (lines[prev] - current)
        lines[pos] = torch.where(active, current + step, current)


def domain_transform(x, g, dims, *, num_iter=3, spatial_sigma=50.0, range_sigma=5.0,
                     min_weight=0.0):
    """kernels.domain_transform.domain_transform: num_iter rounds of the four recursive passes
    (left->right, right->left, top->bottom, bottom->top) over each image's valid (h, w) =
    trunc(dims[n, :2]); weights clamp(exp(mult1_i (1 + g mult2)), min_weight, 1). The valid
    sizes are read in the graph, so any dims work (no check that they fit the blob)."""
    batch, _, height, width = x.shape
    mult1, mult2 = domain_transform_constants(num_iter, spatial_sigma, range_sigma)
    valid = trunc(dims.reshape(batch, -1)[:, :2])
    rows, cols = valid[:, 0], valid[:, 1]
    rows_ok = torch.arange(height, device=x.device).unsqueeze(0) < rows.unsqueeze(1)   # (N, H)
    cols_ok = torch.arange(width, device=x.device).unsqueeze(0) < cols.unsqueeze(1)    # (N, W)
    y = x
    for m1 in mult1:
        w = torch.exp(m1 * (1 + g[:, 0] * mult2))
        w = torch.clamp(torch.clamp(w, min=float(np.float32(min_weight))), max=1.0)   # (N, H, W)
        lines = list(y.permute(3, 0, 1, 2).unbind(0))          # W of (N, C, H)
        columns_w = list(w.permute(2, 0, 1).unbind(0))         # W of (N, H)
        _recursion(lines, columns_w, cols, rows_ok, False)
        _recursion(lines, columns_w, cols, rows_ok, True)
        lines = list(torch.stack(lines, 3).permute(2, 0, 1, 3).unbind(0))   # H of (N, C, W)
        rows_w = list(w.permute(1, 0, 2).unbind(0))            # H of (N, W)
        _recursion(lines, rows_w, rows, cols_ok, False)
        _recursion(lines, rows_w, rows, cols_ok, True)
        y = torch.stack(lines, 2)                               # (N, C, H, W)
    return y


# ------------------------------------------------------------------ pooling
def average_pool2d(x, kernel, pad, stride, out_hw):
    """AVE pooling with Caffe's windows (see segaware_caffe.layers.pooling.pool2d): the in-image
    sum of window o, [o*stride - pad, o*stride - pad + kernel), divided by the window clipped to
    [-pad, size + pad). The sum is a zero-padded average times the kernel area: ONNX's
    AveragePool has no divisor override."""
    height, width = int(x.shape[2]), int(x.shape[3])
    out_h, out_w = out_hw
    after_h = (out_h - 1) * stride[0] + kernel[0] - height - pad[0]
    after_w = (out_w - 1) * stride[1] + kernel[1] - width - pad[1]
    padded = F.pad(x, (pad[1], after_w, pad[0], after_h))
    sums = F.avg_pool2d(padded, kernel, stride) * float(kernel[0] * kernel[1])
    sizes = []
    for out, size, k, p, s in zip((out_h, out_w), (height, width), kernel, pad, stride):
        start = np.arange(out) * s - p
        sizes.append(torch.tensor(np.minimum(start + k, size + p) - start, dtype=x.dtype))
    return sums / (sizes[0][:, None] * sizes[1][None, :])
