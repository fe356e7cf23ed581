"""Im2dist: per-tap distance between a patch centre and each neighbour.

    y[n, k, ho, wo] = sum_c phi(x[n, c, centre] - x[n, c, neighbour_k])

with phi(d) = |d| (L1) or 0.5 d² (L2, the default: half the *squared* distance). Quirks kept:
an out-of-image neighbour gives 0 (BIG with remove_bounds), the centre tap gives BIG with
remove_center, and an output whose patch centre lies outside the image is 0 for every tap.

Backward: L2 is the exact derivative; L1 uses sign(0) = 0, the rule of the original's GPU path
(a zero difference, the centre tap and out-of-image neighbours give no gradient). The original's
CPU path used sign(0) = -1 instead; the released models were trained on the GPU.

The op is `torch.ops.segaware.im2dist` (with its backward op), so torch.compile sees it whole.
float16 / bfloat16 inputs are computed in float32 and the result cast back.
"""
import torch
from torch import Tensor

from . import _cuda, _native
from .geometry import (ConvGeometry, check_tensor, compute_dtype, inside_range, no_autocast,
                       pad_input, patch_view, tap_inside, tap_offsets, unpad)

# FLT_MAX / 100 rounded to float32, the value the original writes for removed taps
BIG = float(torch.tensor(torch.finfo(torch.float32).max / 100, dtype=torch.float32))

NORMS = ("L1", "L2")


# ---------------------------------------------------------------------------------------------
# CPU (vectorised torch; the loop runs over the K taps only)

# bytes of one band's channel differences: about what stays in a core's L2 cache, so that the
# difference, its abs/square and the channel sum run from cache (one pass over the whole
# (N, C, Ho, Wo) tensor per tap instead of three)
CPU_BAND_BYTES = 512 << 10


def _band_rows(x, width):
    batch, channels = x.shape[:2]
    return max(1, CPU_BAND_BYTES // max(1, batch * channels * width * x.element_size()))


def _distance_into(centre, neighbour, part, target, norm_l1):
    """target = sum over channels of phi(centre - neighbour), through the buffer `part`."""
    torch.sub(centre, neighbour, out=part)
    if norm_l1:
        torch.sum(part.abs_(), 1, out=target)
    else:
        torch.sum(part.square_(), 1, out=target).mul_(0.5)


def _is_same_geometry(geometry, height, width):
    """Stride 1 and every output pixel's patch centred on the same input pixel (an odd kernel
    padded by its centre offset): the output is the image's size."""
    return geometry.stride == (1, 1) and tuple(geometry.pad) == geometry.centre_offset and \
        geometry.output_size(height, width) == (height, width)


def _forward_cpu_same(x, geometry, norm_l1, remove_center, remove_bounds):
    """The 'same' geometry without a padded copy, computing one tap of each mirror pair: tap k
    at pixel p compares p with p + d_k, and the mirror tap (offset -d_k) at p + d_k compares
    the same two pixels, phi(a - b) = phi(b - a), so its plane is tap k's shifted by d_k."""
    batch, channels, height, width = x.shape
    kh, kw = geometry.kernel
    (pad_h, pad_w), (ci, cj) = geometry.pad, geometry.centre_tap
    out = x.new_empty((batch, kh * kw, height, width))
    fill = BIG if remove_bounds else 0.0
    computed, copied, done = [], [], set()
    for k, (i, j, offset_h, offset_w) in enumerate(tap_offsets(geometry)):
        plane = out[:, k]
        if remove_center and (i, j) == (ci, cj):
            plane.fill_(BIG)
            continue
        # (the centre tap itself is computed: phi(x - x) is 0, but NaN where x is not finite)
        # pixels [r0, r1) x [c0, c1) whose neighbour (from (n0, m0) on) lies in the image;
        # the rest take the fill value
        r0, r1, n0 = inside_range(0, height, height, pad_h, 1, offset_h)
        c0, c1, m0 = inside_range(0, width, width, pad_w, 1, offset_w)
        plane.fill_(fill)
        if r0 >= r1 or c0 >= c1:
            continue
        mi, mj = 2 * ci - i, 2 * cj - j
        mirror = mi * kw + mj
        region = (k, r0, r1, c0, c1, n0, m0)
        if 0 <= mi < kh and 0 <= mj < kw and mirror in done:
            copied.append((region, mirror))
        else:
            computed.append(region)
        done.add(k)
    if computed and not _distances_native(x, out, computed, norm_l1):
        rows = _band_rows(x, width)
        buffer = x.new_empty((batch, channels, min(rows, height), width))
        for k, r0, r1, c0, c1, n0, m0 in computed:
            for start in range(r0, r1, rows):
                end = min(r1, start + rows)
                _distance_into(x[:, :, start:end, c0:c1],
                               x[:, :, n0 + start - r0:n0 + end - r0, m0:m0 + c1 - c0],
                               buffer[:, :, :end - start, :c1 - c0],
                               out[:, k, start:end, c0:c1], norm_l1)
    for (k, r0, r1, c0, c1, n0, m0), mirror in copied:
        out[:, k, r0:r1, c0:c1] = out[:, mirror, n0:n0 + r1 - r0, m0:m0 + c1 - c0]
    return out


def _distances_native(x, out, computed, norm_l1):
    """The computed taps' inside regions as one compiled loop (kernels/cpu/im2dist.c); False
    where there is none."""
    loop = _native.function("im2dist.c", "distance_taps", x.dtype)
    if loop is None or not x.is_contiguous() or not _native.plain(x, out):
        return False
    batch, channels, height, width = x.shape
    # each tap's neighbour shift in pixels, from its inside region
    taps = torch.tensor([[k, n0 - r0, m0 - c0] for k, r0, _, c0, _, n0, m0 in computed],
                        dtype=torch.long).t().contiguous()
    threads = _native.threads()
    # a band's sums stay in cache; a few bands per thread
    rows = max(1, CPU_BAND_BYTES // (len(computed) * width * x.element_size()))
    rows = max(1, min(rows, -(-height // (4 * threads))))
    bands = -(-height // rows)
    loop(threads, batch * bands, x.data_ptr(), out.data_ptr(), taps[0].data_ptr(),
         taps[1].data_ptr(), taps[2].data_ptr(), len(computed), out.shape[1], channels, height,
         width, int(norm_l1), rows)
    return True


def _forward_cpu(x, geometry, norm_l1, remove_center, remove_bounds):
    batch, channels, height, width = x.shape
    if _is_same_geometry(geometry, height, width):
        return _forward_cpu_same(x, geometry, norm_l1, remove_center, remove_bounds)
    out_h, out_w = out_size = geometry.output_size(height, width)
    padded = pad_input(x, geometry)
    inside = tap_inside(geometry, height, width, x.device)
    centre_inside = inside[geometry.centre_tap]
    centre_h, centre_w = geometry.centre_offset
    out = x.new_empty((batch, geometry.taps) + out_size)
    zero = x.new_zeros(())
    # value of a tap that computes no distance: 0 when the centre is outside the image, else
    # BIG for an out-of-image neighbour with remove_bounds, else 0
    outside_fill = torch.where(centre_inside, x.new_tensor(BIG if remove_bounds else 0.0), zero)
    taps = [(k, i, j, offset_h, offset_w)
            for k, (i, j, offset_h, offset_w) in enumerate(tap_offsets(geometry))
            if not (remove_center and (i, j) == geometry.centre_tap)]
    rows = _band_rows(x, out_w)
    difference = x.new_empty((batch, channels, min(rows, out_h), out_w))
    stride_h = geometry.stride[0]
    for row_start in range(0, out_h, rows):
        band = min(out_h, row_start + rows) - row_start
        band_size = (band, out_w)
        centre = patch_view(padded, row_start * stride_h + centre_h, centre_w, band_size,
                            geometry.stride)
        part = difference[:, :, :band]
        for k, _, _, offset_h, offset_w in taps:
            neighbour = patch_view(padded, row_start * stride_h + offset_h, offset_w, band_size,
                                   geometry.stride)
            _distance_into(centre, neighbour, part, out[:, k, row_start:row_start + band],
                           norm_l1)
    for k, i, j, _, _ in taps:
        out[:, k] = torch.where(centre_inside & inside[i, j], out[:, k], outside_fill)
    if remove_center:
        k = geometry.centre_tap[0] * geometry.kernel[1] + geometry.centre_tap[1]
        out[:, k] = torch.where(centre_inside, x.new_tensor(BIG), zero)
    return out


def _backward_native(grad_out, x, geometry, norm_l1):
    """_backward_cpu as one compiled loop (kernels/cpu/im2dist.c), bit for bit its result
    without its padded copies and per-tap temporaries; None where there is none."""
    loop = _native.function("im2dist.c", "distance_backward", x.dtype)
    if loop is None or not _native.plain(grad_out, x) or grad_out.dtype != x.dtype or \
            not (x.is_contiguous() and grad_out.is_contiguous()):
        return None
    batch, channels, height, width = x.shape
    out_h, out_w = geometry.output_size(height, width)
    grad_x = torch.empty_like(x)
    if loop(_native.threads(), batch * channels, x.data_ptr(), grad_out.data_ptr(),
            grad_x.data_ptr(), channels, height, width, out_h, out_w, *geometry.kernel,
            *geometry.pad, *geometry.stride, *geometry.dilation, int(norm_l1)) != 0:
        raise MemoryError("im2dist backward: no memory for the compiled loop's centre buffer")
    return grad_x


def _backward_cpu(grad_out, x, geometry, norm_l1):
    if x.numel() and grad_out.numel():
        grad_x = _backward_native(grad_out, x, geometry, norm_l1)
        if grad_x is not None:
            return grad_x
    return _backward_torch(grad_out, x, geometry, norm_l1)


def _backward_torch(grad_out, x, geometry, norm_l1):
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
        contribution = difference.sign_() if norm_l1 else difference
        contribution *= (grad_out[:, k] * (centre_inside & inside[i, j])).unsqueeze(1)
        grad_centre += contribution
        patch_view(grad_padded, offset_h, offset_w, out_size, geometry.stride).sub_(contribution)
    patch_view(grad_padded, *geometry.centre_offset, out_size, geometry.stride).add_(grad_centre)
    return unpad(grad_padded, geometry, height, width).contiguous()


# ---------------------------------------------------------------------------------------------
# CUDA (kernels/cuda/im2dist.cu): one thread per written element, gathers only

# `images` > 0 numbers the batch's images from there (tests: offsets beyond 2^31 elements)
def _forward_cuda(x, geometry, norm_l1, remove_center, remove_bounds, images=0):
    return _cuda.launch_tap_planes("im2dist_forward", ("im2dist.cu",), x, geometry,
                                   (norm_l1, remove_center, remove_bounds, BIG), images)


def _backward_cuda(grad_out, x, geometry, norm_l1, images=0):
    batch, channels, height, width = x.shape
    out_size = geometry.output_size(height, width)
    grad_x = torch.empty_like(x)
    _cuda.launch_rows("im2dist_backward", ("im2dist.cu",), batch * channels, height * width,
                      (_cuda.at_image(x, images), _cuda.at_image(grad_out.contiguous(), images),
                       _cuda.at_image(grad_x, images),
                       *_cuda.geometry_args(geometry, channels, height, width, out_size), norm_l1),
                      like=x, row_begin=images * channels)
    return grad_x


# ---------------------------------------------------------------------------------------------
# the ops

@torch.library.custom_op("segaware::im2dist", mutates_args=())
@no_autocast
def im2dist_op(x: Tensor, geometry: list[int], norm_l1: bool, remove_center: bool,
               remove_bounds: bool) -> Tensor:
    """x (N, C, H, W) float32/float64 -> (N, kh*kw, Ho, Wo); geometry = ConvGeometry.as_list()."""
    geometry = ConvGeometry.from_list(geometry)
    x = x.contiguous()
    path = _forward_cuda if x.is_cuda else _forward_cpu
    return path(x, geometry, norm_l1, remove_center, remove_bounds)


@im2dist_op.register_fake
def _(x, geometry, norm_l1, remove_center, remove_bounds):
    geometry = ConvGeometry.from_list(geometry)
    return x.new_empty((x.shape[0], geometry.taps, *geometry.output_size(*x.shape[2:])))


@torch.library.custom_op("segaware::im2dist_backward", mutates_args=())
@no_autocast
def im2dist_backward_op(grad_out: Tensor, x: Tensor, geometry: list[int], norm_l1: bool) -> Tensor:
    geometry = ConvGeometry.from_list(geometry)
    x = x.contiguous()
    path = _backward_cuda if x.is_cuda else _backward_cpu
    return path(grad_out.contiguous(), x, geometry, norm_l1)


@im2dist_backward_op.register_fake
def _(grad_out, x, geometry, norm_l1):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, geometry, norm_l1, _, _ = inputs
    ctx.save_for_backward(x)
    ctx.geometry, ctx.norm_l1 = geometry, norm_l1


def _backward(ctx, grad_out):
    grad_x = None
    if ctx.needs_input_grad[0]:
        (x,) = ctx.saved_tensors
        grad_x = im2dist_backward_op(grad_out, x, ctx.geometry, ctx.norm_l1)
    return grad_x, None, None, None, None


im2dist_op.register_autograd(_backward, setup_context=_setup_context)


def im2dist(x, kernel_size, pad=(0, 0), stride=(1, 1), dilation=(1, 1), norm="L2",
            remove_center=False, remove_bounds=False):
    """Distances between each patch centre and its K = kh*kw neighbours.

    Args:
        x: (N, C, H, W) float16/bfloat16/float32/float64 (the embedding); N may be 0.
        kernel_size, pad, stride, dilation: int or (h, w) pairs, Caffe convolution geometry.
        norm: "L1" (sum of |d|) or "L2" (0.5 * sum of d², the original's default).
        remove_center: the centre tap becomes BIG (= FLT_MAX/100).
        remove_bounds: out-of-image neighbours become BIG instead of 0.
    Returns:
        (N, K, Ho, Wo) in x's dtype, tap k = i*kw + j; outputs whose centre is outside the image
        are 0. (BIG does not fit float16: there removed taps are inf.)
    """
    check_tensor("im2dist", "x", x, dim=4)
    if norm not in NORMS:
        raise ValueError(f"im2dist: norm must be one of {NORMS}, got {norm!r}")
    geometry = ConvGeometry.of(kernel_size, pad, stride, dilation)
    geometry.check_output_size(x.shape[2], x.shape[3], "im2dist")
    dtype = compute_dtype(x.dtype)
    out = im2dist_op(x.to(dtype), geometry.as_list(), norm == "L1", bool(remove_center),
                     bool(remove_bounds))
    return out.to(x.dtype)
