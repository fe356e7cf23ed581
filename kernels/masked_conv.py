"""Fused segmentation-aware convolution.

The released configs compute each segmentation-aware convolution as

    Conv_bottom_is_im2col( Im2col(x) * Tile(mask, C) ),   mask = exp(-|lam * Im2dist_L1(emb)|)

i.e. y[n, o, p] = b[o] + sum_{c, k} W[o, c, k] * x[n, c, p + offset_k] * mask[n, k, p]
(zero padding outside the image). Written that way it stores three (N, C*K, Ho*Wo) tensors.
Here no such tensor exists:

* CPU: the masked columns are built a band of output rows at a time, each band multiplied by the
  weights at once (torch.mm), so only a band-sized buffer (kept per thread) exists; backward
  recomputes the bands. Building the columns and turning column gradients into input and mask
  gradients are compiled loops (kernels/cpu/masked_conv.c) where a C compiler exists, else the
  torch loops below, which compute the same (products below the smallest normal number aside:
  the compiled loop flushes them to zero, see there). In float32 with one group and enough
  channels, the bands are pixel-major instead (see PIXEL_MAJOR): columns (rows, Wo, taps, C)
  from a channels_last copy of x, oneDNN's 1x1 convolution for the products, compiled loops
  for the input and mask gradients; the op's tensors stay in the standard layout.
* CUDA, float32 / float16 / bfloat16: implicit GEMMs on tensor cores (kernels/cuda/
  masked_conv_igemm.cu) that apply the mask while loading each input tile into shared memory and
  never write columns to global memory, for the output and for all three gradients. float32
  uses TF32 mma when torch.backends.cuda.matmul.allow_tf32 is set (as a torch matmul would) and
  otherwise 3xTF32 (about float32 accuracy); the half types use BF16 / FP16 mma; all accumulate
  in float32. GPUs older than compute capability 8.0 run the same tiles with FMA.
* CUDA, float64: the band path with CuPy column kernels and cuBLAS products.

The mask chain (K x Ho x Wo, small) runs as ordinary differentiable ops on top of `im2dist`, so
its gradients follow the original's rules: AbsVal's sign(0) = 0 (torch.abs) and Im2dist L1 with
sign(0) = 0. The fused part is linear in x, mask and W, so its backward is the exact derivative.
"""
import threading

import torch
from torch import Tensor

from . import _cuda, _native
from .geometry import (HALF_DTYPES, ConvGeometry, check_tensor, compute_dtype, inside_range,
                       no_autocast, pad_input, patch_view, register_tap_conv_autograd,
                       tap_offsets, unpad)
from .im2dist import im2dist

# Bytes of masked columns per band. CPU: long enough for the products to run near the GEMM
# rate, short against the unfused (N, C*K, Ho*Wo) tensors (vgg's fused layers at 321x321: 16 MB
# is 5-15% faster than 8 MB at 2 threads and as fast at one; 64 MB is slower); on CUDA (float64)
# a band is large (fewer launches) but still far below the unfused tensors.
CPU_BAND_BYTES = 16 << 20
CUDA_BAND_BYTES = 256 << 20

# "auto": implicit GEMM for float32 / half, bands for float64; "igemm" or "bands" force one
CUDA_IMPL = "auto"

# the implicit-GEMM tile shape (masked_conv_igemm.cu; igemm_tile_shape reports the kernel's)
IGEMM_BM, IGEMM_BN, IGEMM_THREADS = 64, 128, 128
IGEMM_MODES = {"simt": 0, "tf32": 1, "3xtf32": 2, "bf16": 3, "f16": 4}
# weight-gradient partial sums kept at most (bytes); more splits fill the GPU better
IGEMM_PARTIAL_BYTES = 256 << 20


_kept = threading.local()


def band_buffer(numel, like, slot=0):
    """A flat CPU buffer of `numel` elements of like's dtype for one call's bands, kept per thread
    (and `slot`, for a second buffer in the same call) between calls when it fits the band
    budget: a fresh 16 MB buffer faults in its pages on every call (several ms per layer).
    Nothing outside one call of this module holds it."""
    if numel * like.element_size() > CPU_BAND_BYTES:
        return like.new_empty(numel)
    buffers = _kept.__dict__.setdefault("buffers", {})
    buffer = buffers.get((like.dtype, slot))
    if buffer is None or buffer.numel() < numel:
        buffer = like.new_empty(max(numel, CPU_BAND_BYTES // like.element_size()))
        buffers[(like.dtype, slot)] = buffer
    return buffer[:numel]


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

def _masked_columns_cpu(x, mask, geometry, row_start, row_end, columns):
    """Fill columns (N, C, K, rows, Wo) with x[c, p + offset_k] * mask[k, p] for the band of
    output rows, from the unpadded input (no padded copy is made): the pixels inside the image
    are multiplied, and a pixel outside is im2col's zero times the mask (0, or NaN where the
    mask is not finite, as the original's product gives)."""
    height, width = x.shape[2:]
    out_w = mask.shape[3]
    (stride_h, stride_w), (pad_h, pad_w) = geometry.stride, geometry.pad

    def outside(target, k, rows, cols):
        part = target[:, :, rows, cols]
        band_mask = mask[:, k, row_start:row_end][:, rows, cols].unsqueeze(1)
        torch.mul(band_mask.expand_as(part), 0.0, out=part)

    everything = slice(None)
    for k, (_, _, offset_h, offset_w) in enumerate(tap_offsets(geometry)):
        target = columns[:, :, k]
        lo, hi, first_row = inside_range(row_start, row_end, height, pad_h, stride_h, offset_h)
        clo, chi, first_col = inside_range(0, out_w, width, pad_w, stride_w, offset_w)
        if lo >= hi or clo >= chi:
            outside(target, k, everything, everything)
            continue
        a, b = lo - row_start, hi - row_start
        outside(target, k, slice(None, a), everything)
        outside(target, k, slice(b, None), everything)
        outside(target, k, slice(a, b), slice(None, clo))
        outside(target, k, slice(a, b), slice(chi, None))
        pixels = x[:, :, first_row:first_row + (hi - lo - 1) * stride_h + 1:stride_h,
                   first_col:first_col + (chi - clo - 1) * stride_w + 1:stride_w]
        torch.mul(pixels, mask[:, k, lo:hi, clo:chi].unsqueeze(1), out=target[:, :, a:b, clo:chi])
    return columns


def _masked_columns_native(x, mask, geometry, row_start, row_end, columns):
    """_masked_columns_cpu as one compiled loop (kernels/cpu/masked_conv.c), element for element
    the same products; False where there is none (the caller then runs the torch loop)."""
    loop = _native.function("masked_conv.c", "masked_columns", x.dtype)
    if loop is None or not _native.plain(x, mask, columns) or \
            not (x.is_contiguous() and mask.is_contiguous() and columns.is_contiguous()):
        return False
    batch, channels, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    loop(_native.threads(), batch * channels, x.data_ptr(), mask.data_ptr(), columns.data_ptr(),
         channels, height, width, out_h, out_w, *geometry.kernel, *geometry.pad,
         *geometry.stride, *geometry.dilation, row_start, row_end)
    return True


def masked_columns_cpu(x, mask, geometry, row_start, row_end, columns):
    """Masked columns (N, C, K, rows, Wo) of a band: compiled where available, else torch."""
    if not _masked_columns_native(x, mask, geometry, row_start, row_end, columns):
        _masked_columns_cpu(x, mask, geometry, row_start, row_end, columns)
    return columns


def _forward_cpu(x, mask, weight, bias, geometry, group, activation=None, channels_last=False):
    """The band loop. `activation` (inference only): None, or the negative slope of a ReLU /
    leaky ReLU applied to the top, like the bias on each band while it is still in cache.
    `channels_last` (inference only, one group): the top in channels_last memory, each band's
    pixels times the transposed weights."""
    batch, channels, _, _ = x.shape
    out_h, out_w = mask.shape[2:]
    num_output = weight.shape[0]
    taps = geometry.taps
    group_columns = channels // group * taps
    weight_groups = weight.reshape(group, num_output // group, group_columns)
    channels_last = channels_last and group == 1
    if channels_last:
        pixels = x.new_empty((batch, out_h, out_w, num_output))
        out = pixels.permute(0, 3, 1, 2)
    else:
        out = x.new_empty((batch, num_output, out_h, out_w))
    rows = band_rows(batch, channels, taps, out_w, x.element_size(), CPU_BAND_BYTES)
    # flat, so that a short last band is a contiguous (N, C*K, band, Wo) block as well
    buffer = band_buffer(batch * channels * taps * rows * out_w, x)
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band = row_end - row_start
        columns = buffer[:batch * channels * taps * band * out_w].view(
            batch, channels * taps, band, out_w)
        masked_columns_cpu(x, mask, geometry, row_start, row_end,
                           columns.unflatten(1, (channels, taps)))
        # (N, group, column rows of a group, band pixels)
        columns = columns.flatten(2).unflatten(1, (group, -1))
        # (N, group, O/group, band pixels): rows of H*W stride, which BLAS writes directly
        out_groups = None if channels_last else out[:, :, row_start:row_end].view(
            batch, group, num_output // group, band * out_w)
        # 2-D products (torch.mm) rather than a broadcast matmul: batched GEMM is slower on CPU
        for n in range(batch):
            if channels_last:
                torch.mm(columns[n, 0].t(), weight_groups[0].t(),
                         out=pixels[n, row_start:row_end].view(band * out_w, num_output))
                continue
            for g in range(group):
                torch.mm(weight_groups[g], columns[n, g], out=out_groups[n, g])
        # bias and activation on the band while it is in cache (addmm's copy of the bias into
        # each band's strided rows is slower than this add)
        top = out[:, :, row_start:row_end]
        if bias is not None:
            top += bias.view(1, -1, 1, 1)
        if activation == 0:
            torch.relu_(top)
        elif activation is not None:
            torch.nn.functional.leaky_relu_(top, activation)
    return out


# Pixel-major bands (float32 CPU, one group): each band's masked columns are written pixel by
# pixel, (rows, Wo, taps, C), and multiplied by oneDNN's 1x1 convolution (forward) or by the
# weights with the pixels as rows (backward). oneDNN's kernels run these products at up to twice
# the rate of the row-major band GEMM with few output rows (vgg's layers on an AMD Zen 4 core:
# 90-98 vs 45-55 GFLOP/s). False: always the row-major bands.
PIXEL_MAJOR = True
# taps x channels per output below which the pixel-major product is slower (conv1_1's 27)
PIXEL_MAJOR_COLUMNS = 128
# the backward's column gradients by oneDNN's 1x1 convolution (else torch.mm: 1.3-1.7x slower
# on vgg's layers on AMD Zen 4)
GRAD_COLUMNS_ONEDNN = True
_PIXEL_LOOPS = ("masked_pixel_columns", "masked_pixel_columns_grad_x",
                "masked_pixel_columns_grad_mask")


def onednn_pointwise_available():
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_convolution_pointwise") and \
        hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")


def pixel_major_applies(x, weight, group):
    """Whether the CPU op runs pixel-major bands for these operands (see PIXEL_MAJOR)."""
    return PIXEL_MAJOR and group == 1 and x.dtype == torch.float32 and \
        weight.dtype == torch.float32 and weight[0].numel() >= PIXEL_MAJOR_COLUMNS and \
        x.numel() > 0 and _native.plain(x, weight) and onednn_pointwise_available() and \
        all(_native.function("masked_conv.c", name, x.dtype) is not None
            for name in _PIXEL_LOOPS) and \
        _native.function("layout.c", "planes_to_rows", x.dtype) is not None and \
        _native.function("layout.c", "rows_to_planes", x.dtype) is not None


class PackedPointwise:
    """oneDNN's 1x1 convolution of channels_last inputs by one (G * O, C, 1, 1) kernel of
    `groups` groups, with the kernel reordered once per input shape: the blocked format
    depends on the image size, and an input of another shape than the reordering's is
    reordered at every call (a band of 1 x 41 pixels: 127 ms instead of 2.3)."""

    def __init__(self, kernel, groups=1):
        # the kernel, or a function making it (nothing dense is then kept between reorderings)
        self.kernel, self.groups = kernel, groups
        self._reordered = {}

    def _weights(self, shape):
        weights = self._reordered.get(shape)
        if weights is None:
            if len(self._reordered) >= 4:       # (a band loop needs two: a band, the last)
                self._reordered.clear()
            kernel = self.kernel() if callable(self.kernel) else self.kernel
            zero, one = [0, 0], [1, 1]
            weights = self._reordered[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                kernel.to_mkldnn(), zero, one, one, self.groups, list(shape))
        return weights

    def __call__(self, x, bias=None, attr="none", scalars=()):
        zero, one = [0, 0], [1, 1]
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._weights(tuple(x.shape)), bias, zero, one, one, self.groups, attr,
            list(scalars), "")

    def add_into(self, out, x):
        """out += the product (oneDNN's sum post-op: no new tensor)."""
        zero, one = [0, 0], [1, 1]
        torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x, self._weights(tuple(x.shape)), None, zero, one, one, self.groups, "add",
            1.0, None, [], "")
        return out


def to_channels_last(x):
    """x (N, C, H, W) in the standard layout copied to channels_last memory (layout.c)."""
    num, channels, height, width = x.shape
    x = x.contiguous()
    rows = x.new_empty((num, height, width, channels))
    _native.function("layout.c", "planes_to_rows", x.dtype)(
        _native.threads(), num, x.data_ptr(), rows.data_ptr(), height * width, channels)
    return rows.permute(0, 3, 1, 2)


def to_standard(x):
    """x (N, C, H, W) in channels_last memory copied to the standard layout (layout.c)."""
    num, channels, height, width = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    planes = x.new_empty((num, channels, height, width))
    _native.function("layout.c", "rows_to_planes", x.dtype)(
        _native.threads(), num, x.data_ptr(), planes.data_ptr(), None, height * width, channels)
    return planes


def _forward_pixel_major_cpu(x, mask, weight, bias, geometry):
    """The op's forward through pixel-major bands; None where oneDNN refuses the product."""
    product = PackedPointwise(pixel_major_weight(weight))
    try:
        top = masked_conv2d_pixel_major(to_channels_last(x), mask, weight.shape[0], geometry,
                                        lambda columns: product(columns, bias))
    except RuntimeError:
        return None
    return to_standard(top) if top is not None else None


def _backward_pixel_major_cpu(grad_out, x, mask, weight, geometry, needs):
    """The op's backward through pixel-major bands: per band, the weight gradient is the output
    gradient's pixel rows transposed times the recomputed columns, and the column gradients
    (pixel rows) the output gradient times the weights, which the compiled loops turn into
    grad_x (channels_last, converted at the end) and grad_mask."""
    need_x, need_mask, need_weight = needs
    batch, channels, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    num_output, taps = weight.shape[0], geometry.taps
    width_columns = taps * channels
    x_rows = to_channels_last(x)
    grad_rows = to_channels_last(grad_out).permute(0, 2, 3, 1)      # (N, Ho, Wo, O)
    weight_rows = pixel_major_weight(weight).view(num_output, width_columns)
    grad_x = torch.zeros((batch, height, width, channels), dtype=x.dtype) if need_x else None
    grad_mask = torch.empty_like(mask) if need_mask else None
    grad_weight = torch.zeros_like(weight_rows) if need_weight else None
    rows = min(out_h, band_rows(batch, channels, taps, out_w, x.element_size(), CPU_BAND_BYTES))
    numel = batch * rows * out_w * width_columns
    buffer = band_buffer(numel, x) if need_weight else None
    grad_buffer = band_buffer(numel, x, slot=1) if need_x or need_mask else None
    sizes = (channels, height, width, out_h, out_w, *geometry.kernel, *geometry.pad,
             *geometry.stride, *geometry.dilation)
    loop_x, loop_mask = (_native.function("masked_conv.c", name, x.dtype)
                         for name in _PIXEL_LOOPS[1:])
    transposed = None       # the column gradients' product (False: oneDNN refused it)
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band_pixels = (row_end - row_start) * out_w
        grad_band = grad_rows[:, row_start:row_end].reshape(batch, band_pixels, num_output)
        if need_weight:
            columns = buffer[:batch * band_pixels * width_columns].view(
                batch, row_end - row_start, out_w, width_columns)
            masked_pixel_columns_cpu(x_rows, mask, geometry, row_start, row_end, columns)
            columns = columns.view(batch, band_pixels, width_columns)
            for n in range(batch):
                grad_weight.addmm_(grad_band[n].t(), columns[n])
        if need_x or need_mask:
            grad_columns = grad_buffer[:batch * band_pixels * width_columns].view(
                batch, band_pixels, width_columns)
            if GRAD_COLUMNS_ONEDNN and transposed is not False:
                if transposed is None:
                    transposed = PackedPointwise(
                        weight_rows.t().contiguous().view(width_columns, num_output, 1, 1))
                # written into the kept buffer (a fresh 16 MB result faults in its pages)
                grad_columns.zero_()
                band_shape = (batch, row_end - row_start, out_w)
                try:
                    transposed.add_into(
                        grad_columns.view(*band_shape, width_columns).permute(0, 3, 1, 2),
                        grad_band.view(*band_shape, num_output).permute(0, 3, 1, 2))
                except RuntimeError:        # oneDNN refused: torch.mm from here on
                    transposed = False
            if not GRAD_COLUMNS_ONEDNN or transposed is False:
                for n in range(batch):
                    torch.mm(grad_band[n], weight_rows, out=grad_columns[n])
            if need_x:
                loop_x(_native.threads(), batch, grad_columns.data_ptr(), mask.data_ptr(),
                       grad_x.data_ptr(), *sizes, row_start, row_end)
            if need_mask:
                loop_mask(_native.threads(), batch, grad_columns.data_ptr(), x_rows.data_ptr(),
                          grad_mask.data_ptr(), *sizes, row_start, row_end)
    if need_x:
        grad_x = to_standard(grad_x.permute(0, 3, 1, 2))
    if need_weight:
        grad_weight = grad_weight.view(num_output, taps, channels).transpose(1, 2).contiguous(
        ).view(weight.shape)
    return grad_x, grad_mask, grad_weight


def pixel_major_weight(weight):
    """(O, C, kh, kw) weights as the (O, taps * C, 1, 1) kernel of a 1x1 convolution over
    pixel-major columns (tap-major, then channel: masked_pixel_columns' order)."""
    num_output, channels = weight.shape[:2]
    return weight.reshape(num_output, channels, -1).transpose(1, 2).reshape(
        num_output, -1, 1, 1).contiguous()


def masked_pixel_columns_cpu(x, mask, geometry, row_start, row_end, columns):
    """Pixel-major masked columns of a band, (N, rows, Wo, taps, C) in `columns`' memory, from
    x in channels_last memory: a compiled loop (kernels/cpu/masked_conv.c), element for element
    masked_columns_cpu's products in another order. False where there is no compiled loop."""
    loop = _native.function("masked_conv.c", "masked_pixel_columns", x.dtype)
    if loop is None or not _native.plain(x, mask, columns) or not mask.is_contiguous() or \
            not x.is_contiguous(memory_format=torch.channels_last) or not columns.is_contiguous():
        return False
    batch, channels, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    loop(_native.threads(), batch, x.data_ptr(), mask.data_ptr(), columns.data_ptr(), channels,
         height, width, out_h, out_w, *geometry.kernel, *geometry.pad, *geometry.stride,
         *geometry.dilation, row_start, row_end)
    return True


def masked_conv2d_pixel_major(x, mask, num_output, geometry, band_product):
    """The fused convolution's forward (one group) from pixel-major band columns, for a product
    that prefers them: `band_product(columns)` maps one band's columns, an (N, taps * C, rows,
    Wo) tensor in channels_last memory, to the band's top (N, O, rows, Wo) -- a 1x1 convolution
    with the weights of pixel_major_weight, the bias and any activation. Returns the top in
    channels_last memory, or None where the compiled column loop is missing."""
    batch, channels = x.shape[:2]
    out_h, out_w = mask.shape[2:]
    x = x.contiguous(memory_format=torch.channels_last)
    mask = mask.contiguous()
    width = geometry.taps * channels
    rows = min(out_h, band_rows(batch, channels, geometry.taps, out_w, x.element_size(),
                                CPU_BAND_BYTES))
    buffer = band_buffer(batch * rows * out_w * width, x)
    out = x.new_empty((batch, out_h, out_w, num_output)).permute(0, 3, 1, 2)
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band = row_end - row_start
        columns = buffer[:batch * band * out_w * width].view(batch, band, out_w, width)
        if not masked_pixel_columns_cpu(x, mask, geometry, row_start, row_end, columns):
            return None
        out[:, :, row_start:row_end] = band_product(columns.permute(0, 3, 1, 2))
    return out


def masked_conv2d_inference(x, mask, weight, bias, geometry, group, activation=None,
                            channels_last=False):
    """The forward of masked_conv2d_op without autograd or dispatch, for the inference graph
    (no gradient is taken), with an optional ReLU / leaky ReLU (negative slope `activation`);
    `channels_last`: the CPU band loop gives its top in channels_last memory (one group)."""
    if _native.plain(x, mask, weight) and x.dtype in (torch.float32, torch.float64) and \
            mask.dtype == x.dtype and weight.dtype == x.dtype and \
            (bias is None or bias.dtype == x.dtype):
        bias = bias.contiguous() if bias is not None else None
        return _forward_cpu(x.contiguous(), mask.contiguous(), weight.contiguous(), bias,
                            geometry, group, activation, channels_last)
    out = masked_conv2d(x, weight, bias, mask=mask, kernel_size=geometry.kernel,
                        pad=geometry.pad, stride=geometry.stride, dilation=geometry.dilation,
                        group=group)
    if activation == 0:
        return torch.relu_(out)
    if activation is not None:
        return torch.nn.functional.leaky_relu_(out, activation)
    return out


def _backward_start(x, mask, weight, geometry, group, needs):
    """What both band-wise backward paths start from: the grouped weight (group, O/group,
    C/group * taps), and the mask's and the grouped weight's gradient buffers where needed."""
    group_columns = x.shape[1] // group * geometry.taps
    weight_groups = weight.reshape(group, weight.shape[0] // group, group_columns)
    grad_mask = torch.empty_like(mask) if needs[1] else None
    grad_weight = torch.zeros_like(weight_groups) if needs[2] else None
    return group_columns, weight_groups, grad_mask, grad_weight


def _output_bands(grad_out, rows, group):
    """(row_start, row_end, band height, the band of grad_out as (N, group, O/group, pixels)) over
    the output rows, `rows` at a time."""
    batch, num_output, out_h, out_w = grad_out.shape
    for row_start in range(0, out_h, rows):
        row_end = min(out_h, row_start + rows)
        band = row_end - row_start
        yield row_start, row_end, band, grad_out[:, :, row_start:row_end].reshape(
            batch, group, num_output // group, band * out_w)


def _input_gradients_native(grad_columns, x, mask, geometry, row_start, row_end, grad_x,
                            grad_mask):
    """The band's grad_x (accumulated into the unpadded grad_x) and grad_mask rows from its
    column gradients, as compiled loops; False where there are none."""
    loops = [_native.function("masked_conv.c", name, x.dtype)
             for name in ("masked_columns_grad_x", "masked_columns_grad_mask")]
    if None in loops or not _native.plain(grad_columns, x, mask) or \
            not (x.is_contiguous() and mask.is_contiguous()):
        return False
    batch, channels, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    sizes = (channels, height, width, out_h, out_w, *geometry.kernel, *geometry.pad,
             *geometry.stride, *geometry.dilation, row_start, row_end)
    if grad_x is not None:
        loops[0](_native.threads(), batch * channels, grad_columns.data_ptr(), mask.data_ptr(),
                 grad_x.data_ptr(), *sizes)
    if grad_mask is not None:
        loops[1](_native.threads(), batch * geometry.taps, grad_columns.data_ptr(),
                 x.data_ptr(), grad_mask.data_ptr(), *sizes)
    return True


def _input_gradients_torch(grad_columns, padded, mask, geometry, row_start, row_end,
                           grad_padded, grad_mask):
    """The same in torch, tap by tap, on the zero-padded input and its gradient."""
    out_w = mask.shape[3]
    for k, (_, _, offset_h, offset_w) in enumerate(tap_offsets(geometry)):
        if grad_mask is not None:
            pixels = _band_view(padded, offset_h, offset_w, row_start, row_end, out_w,
                                geometry.stride)
            grad_mask[:, k, row_start:row_end] = (grad_columns[:, :, k] * pixels).sum(1)
        if grad_padded is not None:
            target = _band_view(grad_padded, offset_h, offset_w, row_start, row_end, out_w,
                                geometry.stride)
            target.addcmul_(grad_columns[:, :, k], mask[:, k, row_start:row_end].unsqueeze(1))


def _backward_cpu(grad_out, x, mask, weight, geometry, group, needs):
    need_x, need_mask, need_weight = needs
    batch, channels, height, width = x.shape
    out_w = mask.shape[3]
    taps = geometry.taps
    group_columns, weight_groups, grad_mask, grad_weight = _backward_start(
        x, mask, weight, geometry, group, needs)
    # compiled loops accumulate into grad_x itself; the torch loop into a padded copy
    grad_x = torch.zeros_like(x) if need_x else None
    padded = grad_padded = None
    rows = band_rows(batch, channels, taps, out_w, x.element_size(), CPU_BAND_BYTES)
    numel = batch * channels * taps * rows * out_w
    buffer = band_buffer(numel, x) if need_weight else None
    grad_buffer = band_buffer(numel, x, slot=1) if need_x or need_mask else None
    for row_start, row_end, band, grad_band in _output_bands(grad_out, rows, group):
        band_numel = batch * channels * taps * band * out_w
        if need_weight:
            columns = masked_columns_cpu(x, mask, geometry, row_start, row_end,
                                         buffer[:band_numel].view(batch, channels, taps, band,
                                                                  out_w))
            columns = columns.reshape(batch, group, group_columns, band * out_w)
            for n in range(batch):
                for g in range(group):
                    grad_weight[g].addmm_(grad_band[n, g], columns[n, g].t())
        if need_x or need_mask:
            grad_columns = grad_buffer[:band_numel].view(batch, group, group_columns,
                                                         band * out_w)
            for n in range(batch):
                for g in range(group):
                    torch.mm(weight_groups[g].t(), grad_band[n, g], out=grad_columns[n, g])
            grad_columns = grad_columns.view(batch, channels, taps, band, out_w)
            if _input_gradients_native(grad_columns, x, mask, geometry, row_start, row_end,
                                       grad_x, grad_mask):
                continue
            if padded is None:
                padded = pad_input(x, geometry)
                grad_padded = torch.zeros_like(padded) if need_x else None
            _input_gradients_torch(grad_columns, padded, mask, geometry, row_start, row_end,
                                   grad_padded, grad_mask)
    if grad_padded is not None:
        grad_x = unpad(grad_padded, geometry, height, width).contiguous()
    if need_weight:
        grad_weight = grad_weight.reshape(weight.shape)
    return grad_x, grad_mask, grad_weight


# ---------------------------------------------------------------------------------------------
# CUDA, bands (float64): CuPy kernels build the masked band columns and turn column gradients
# back into mask and input gradients; the products are torch matmuls (cuBLAS). Same band loop and
# index order as the CPU path. `images` > 0 starts the kernels' image numbering there (tests).

_BANDS = ("masked_conv_bands.cu",)


def _band_args(x, mask, geometry, row_start):
    _, channels, height, width = x.shape
    return (*_cuda.geometry_args(geometry, channels, height, width, mask.shape[2:]), row_start)


def _masked_columns_cuda(x, mask, geometry, row_start, row_end, columns, images=0):
    batch, channels = x.shape[:2]
    band = row_end - row_start
    per_image = channels * geometry.taps * band * mask.shape[3]
    _cuda.launch_rows("masked_columns", _BANDS, batch * channels * geometry.taps,
                      band * mask.shape[3],
                      (_cuda.at_image(x, images), _cuda.at_image(mask, images),
                       _cuda.at_image(columns.view(batch, per_image), images),
                       *_band_args(x, mask, geometry, row_start)),
                      like=x, row_begin=images * channels * geometry.taps)
    return columns


def input_rows_of_band(geometry, height, row_start, row_end):
    """[first, end) of the input rows that output rows [row_start, row_end) read (clipped)."""
    first = row_start * geometry.stride[0] - geometry.pad[0]
    last = ((row_end - 1) * geometry.stride[0] - geometry.pad[0]
            + (geometry.kernel[0] - 1) * geometry.dilation[0])
    return max(0, first), min(height, last + 1)


def _forward_bands_cuda(x, mask, weight, bias, geometry, group, images=0):
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
        _masked_columns_cuda(x, mask, geometry, row_start, row_end, columns, images)
        columns = columns.view(batch, group, channels // group * taps, band * out_w)
        band_out = torch.matmul(weight_groups, columns)
        out[:, :, row_start:row_end] = band_out.reshape(batch, num_output, band, out_w)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def _backward_bands_cuda(grad_out, x, mask, weight, geometry, group, needs, images=0):
    need_x, need_mask, need_weight = needs
    batch, channels, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    taps = geometry.taps
    group_columns, weight_groups, grad_mask, grad_weight = _backward_start(
        x, mask, weight, geometry, group, needs)
    grad_x = torch.zeros_like(x) if need_x else None
    rows = band_rows(batch, channels, taps, out_w, x.element_size(), CUDA_BAND_BYTES)
    buffer = x.new_empty(batch * channels * taps * min(rows, out_h) * out_w)
    for row_start, row_end, band, grad_band in _output_bands(grad_out, rows, group):
        if need_weight:
            columns = buffer[:batch * channels * taps * band * out_w]
            _masked_columns_cuda(x, mask, geometry, row_start, row_end, columns, images)
            columns = columns.view(batch, group, group_columns, band * out_w)
            grad_weight += torch.matmul(grad_band, columns.transpose(-1, -2)).sum(0)
        if need_x or need_mask:
            grad_columns = torch.matmul(weight_groups.transpose(-1, -2), grad_band).contiguous()
            grad_columns_arg = _cuda.at_image(
                grad_columns.view(batch, channels * taps * band * out_w), images)
            band_args = _band_args(x, mask, geometry, row_start)
            if need_mask:
                _cuda.launch_rows("masked_columns_grad_mask", _BANDS, batch * taps, band * out_w,
                                  (_cuda.at_image(x, images), grad_columns_arg,
                                   _cuda.at_image(grad_mask, images), *band_args),
                                  like=x, row_begin=images * taps)
            if need_x:
                # only the input rows this band's taps read
                first, end = input_rows_of_band(geometry, height, row_start, row_end)
                _cuda.launch_rows("masked_columns_grad_x", _BANDS, batch * channels,
                                  (end - first) * width,
                                  (grad_columns_arg, _cuda.at_image(mask, images),
                                   _cuda.at_image(grad_x, images), *band_args, band, first),
                                  like=x, row_begin=images * channels)
    if need_weight:
        grad_weight = grad_weight.reshape(weight.shape)
    return grad_x, grad_mask, grad_weight


# ---------------------------------------------------------------------------------------------
# CUDA, implicit GEMM (float32 / float16 / bfloat16; float64 too, with mode "simt")

def igemm_mode(dtype, capability):
    """The inner product the implicit GEMM uses for `dtype` on a GPU of `capability`."""
    if dtype == torch.float64 or capability[0] < 8:
        return "simt"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "f16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "3xtf32"


def igemm_k_slice(dtype, mode):
    """BK of the tile shape for (dtype, mode)."""
    if mode in ("bf16", "f16"):
        return 32
    return 8 if dtype == torch.float64 else 16


def _igemm_code(dtype, mode):
    return _cuda.kernel_code(dtype, ("masked_conv_igemm.cu",), (("IGEMM_MODE", IGEMM_MODES[mode]),))


def _ceil_div(a, b):
    return -(-a // b)


def _grid(x, y, z):
    return (min(x, _cuda.INT32_MAX), min(y, _cuda.MAX_GRID_Y), min(z, _cuda.MAX_GRID_Y))


def _sizes(x, weight, mask, geometry, group):
    _, channels, height, width = x.shape
    return (_cuda.geometry_args(geometry, channels, height, width, mask.shape[2:])
            + (weight.shape[0], group))


def igemm_weights(weight, group, kernel):
    """The weights in the K order of one implicit-GEMM kernel: "forward" (O, taps, C/g),
    "input" (group, C/g, taps, O/g), "mask" (group, taps, C/g, O/g)."""
    outputs, in_per_group = weight.shape[:2]
    grouped = weight.reshape(group, outputs // group, in_per_group, -1)
    if kernel == "forward":
        return weight.reshape(outputs, in_per_group, -1).transpose(1, 2).contiguous()
    if kernel == "input":
        return grouped.permute(0, 2, 3, 1).contiguous()
    return grouped.permute(0, 3, 2, 1).contiguous()


def _forward_igemm(x, mask, weight, bias, geometry, group, mode, images=0):
    batch, _, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    outputs = weight.shape[0]
    acc = compute_dtype(x.dtype)
    out = x.new_empty((batch, outputs, out_h, out_w))
    grid = _grid(_ceil_div(out_h * out_w, IGEMM_BN),
                 group * _ceil_div(outputs // group, IGEMM_BM), batch)
    # every slice of the reduction within one tap: the kernel variant without per-element taps
    aligned = (x.shape[1] // group) % igemm_k_slice(x.dtype, mode) == 0
    name = "igemm_forward_aligned" if aligned else "igemm_forward"
    _cuda.launch(name, _igemm_code(x.dtype, mode), grid=grid,
                 block=(IGEMM_THREADS, 1, 1), like=x,
                 args=(_cuda.at_image(x, images), _cuda.at_image(mask, images, acc),
                       igemm_weights(weight, group, "forward"),
                       _cuda.Typed(bias if bias is not None else mask, acc), bias is not None,
                       _cuda.at_image(out, images), *_sizes(x, weight, mask, geometry, group),
                       images, images + batch))
    return out


def weight_splits(tiles, chunks, partial_bytes_per_split, multiprocessors):
    """How many blocks share the reduction of each weight-gradient tile: about four blocks per
    multiprocessor in all, at most one split per pixel chunk, within IGEMM_PARTIAL_BYTES."""
    wanted = _ceil_div(4 * multiprocessors, max(1, tiles))
    affordable = max(1, IGEMM_PARTIAL_BYTES // max(1, partial_bytes_per_split))
    return max(1, min(wanted, chunks, affordable, _cuda.MAX_GRID_Y))


def _backward_igemm(grad_out, x, mask, weight, geometry, group, needs, mode, images=0,
                    multiprocessors=None):
    need_x, need_mask, need_weight = needs
    batch, channels, height, width = x.shape
    out_h, out_w = mask.shape[2:]
    outputs = weight.shape[0]
    taps = geometry.taps
    acc = compute_dtype(x.dtype)
    code = _igemm_code(x.dtype, mode)
    sizes = _sizes(x, weight, mask, geometry, group)
    block = (IGEMM_THREADS, 1, 1)
    in_per_group, out_per_group = channels // group, outputs // group
    out_plane = out_h * out_w
    if multiprocessors is None:
        multiprocessors = _cuda.multiprocessors(_cuda.device_index(x)) if x.is_cuda else 2
    grad_out = grad_out.contiguous()
    grad_x = grad_mask = grad_weight = None
    if need_x:
        grad_x = torch.empty_like(x)
        grid = _grid(_ceil_div(height * width, IGEMM_BN),
                     group * _ceil_div(in_per_group, IGEMM_BM), batch)
        aligned = out_per_group % igemm_k_slice(x.dtype, mode) == 0
        name = "igemm_backward_input_aligned" if aligned else "igemm_backward_input"
        _cuda.launch(name, code, grid=grid, block=block, like=x,
                     args=(_cuda.at_image(grad_out, images), _cuda.at_image(mask, images, acc),
                           igemm_weights(weight, group, "input"), _cuda.at_image(grad_x, images),
                           *sizes, images, images + batch))
    if need_mask:
        channel_tiles = group * _ceil_div(in_per_group, IGEMM_BM)
        partial = x.new_empty((batch, channel_tiles, taps, out_plane), dtype=acc)
        grid = _grid(_ceil_div(out_plane, IGEMM_BN), taps * channel_tiles, batch)
        _cuda.launch("igemm_backward_mask", code, grid=grid, block=block, like=x,
                     args=(_cuda.at_image(grad_out, images), _cuda.at_image(x, images),
                           igemm_weights(weight, group, "mask"),
                           _cuda.at_image(partial, images, acc), *sizes, images, images + batch))
        grad_mask = partial.sum(1).view(batch, taps, out_h, out_w)
    if need_weight:
        columns = in_per_group * taps
        tiles = _ceil_div(columns, IGEMM_BN) * group * _ceil_div(out_per_group, IGEMM_BM)
        chunks = batch * _ceil_div(out_plane, igemm_k_slice(x.dtype, mode))
        if chunks > _cuda.INT32_MAX:
            raise OverflowError(f"masked_conv2d: {chunks} pixel slices exceed the 32-bit range "
                                f"of the weight-gradient kernel")
        splits = weight_splits(tiles, chunks, outputs * columns * 4, multiprocessors)
        partial = x.new_empty((splits, outputs, columns), dtype=acc)
        grid = _grid(_ceil_div(columns, IGEMM_BN), group * _ceil_div(out_per_group, IGEMM_BM),
                     splits)
        _cuda.launch("igemm_backward_weight", code, grid=grid, block=block, like=x,
                     args=(_cuda.at_image(grad_out, images), _cuda.at_image(x, images),
                           _cuda.at_image(mask, images, acc), _cuda.Typed(partial, acc), *sizes,
                           images, images + batch, splits))
        grad_weight = partial.sum(0).view(weight.shape).to(weight.dtype)
    return grad_x, grad_mask, grad_weight


def _use_igemm(dtype):
    if CUDA_IMPL not in ("auto", "igemm", "bands"):
        raise ValueError(f"masked_conv.CUDA_IMPL must be 'auto', 'igemm' or 'bands', got "
                         f"{CUDA_IMPL!r}")
    return CUDA_IMPL == "igemm" or (CUDA_IMPL == "auto" and dtype != torch.float64)


def _forward_cuda(x, mask, weight, bias, geometry, group):
    if _use_igemm(x.dtype):
        mode = igemm_mode(x.dtype, _cuda.compute_capability(_cuda.device_index(x)))
        return _forward_igemm(x, mask, weight, bias, geometry, group, mode)
    return _upcast_forward(_forward_bands_cuda, x, mask, weight, bias, geometry, group)


def _backward_cuda(grad_out, x, mask, weight, geometry, group, needs):
    if _use_igemm(x.dtype):
        mode = igemm_mode(x.dtype, _cuda.compute_capability(_cuda.device_index(x)))
        return _backward_igemm(grad_out, x, mask, weight, geometry, group, needs, mode)
    return _upcast_backward(_backward_bands_cuda, grad_out, x, mask, weight, geometry, group,
                            needs)


# paths that compute in float32 / float64 only: half inputs go up and the results come back
def _upcast_forward(path, x, mask, weight, bias, geometry, group):
    if x.dtype not in HALF_DTYPES:
        return path(x, mask, weight, bias, geometry, group)
    out = path(x.float(), mask, weight.float(), bias, geometry, group)
    return out.to(x.dtype)


def _upcast_backward(path, grad_out, x, mask, weight, geometry, group, needs):
    if x.dtype not in HALF_DTYPES:
        return path(grad_out, x, mask, weight, geometry, group, needs)
    grad_x, grad_mask, grad_weight = path(grad_out.float(), x.float(), mask, weight.float(),
                                          geometry, group, needs)
    return (grad_x.to(x.dtype) if grad_x is not None else None, grad_mask,
            grad_weight.to(weight.dtype) if grad_weight is not None else None)


# ---------------------------------------------------------------------------------------------
# the ops. Dtypes: x and weight share one (float16 / bfloat16 / float32 / float64); mask and
# bias are float32 for half x, else x's dtype. The output and grad_x are in x's dtype, grad_mask
# and grad_bias in the mask's, grad_weight in the weight's.

@torch.library.custom_op("segaware::masked_conv2d", mutates_args=())
@no_autocast
def masked_conv2d_op(x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None,
                     geometry: list[int], group: int) -> Tensor:
    geometry = ConvGeometry.from_list(geometry)
    x, mask, weight = x.contiguous(), mask.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if x.is_cuda:
        return _forward_cuda(x, mask, weight, bias, geometry, group)
    if pixel_major_applies(x, weight, group) and mask.dtype == torch.float32:
        top = _forward_pixel_major_cpu(x, mask, weight, bias, geometry)
        if top is not None:
            return top
    return _upcast_forward(_forward_cpu, x, mask, weight, bias, geometry, group)


@masked_conv2d_op.register_fake
def _(x, mask, weight, bias, geometry, group):
    return x.new_empty((x.shape[0], weight.shape[0], *mask.shape[2:]))


@torch.library.custom_op("segaware::masked_conv2d_backward", mutates_args=())
@no_autocast
def masked_conv2d_backward_op(grad_out: Tensor, x: Tensor, mask: Tensor, weight: Tensor,
                              geometry: list[int], group: int,
                              needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_mask, grad_weight, grad_bias); entries not in needs = (x, mask, weight,
    bias) are empty tensors."""
    geometry = ConvGeometry.from_list(geometry)
    grad_out, x = grad_out.contiguous(), x.contiguous()
    mask, weight = mask.contiguous(), weight.contiguous()
    if x.is_cuda:
        grads = _backward_cuda(grad_out, x, mask, weight, geometry, group, tuple(needs[:3]))
    elif pixel_major_applies(x, weight, group) and mask.dtype == grad_out.dtype == torch.float32:
        grads = _backward_pixel_major_cpu(grad_out, x, mask, weight, geometry, tuple(needs[:3]))
    else:
        grads = _upcast_backward(_backward_cpu, grad_out, x, mask, weight, geometry, group,
                                 tuple(needs[:3]))
    grad_bias = (grad_out.sum((0, 2, 3), dtype=mask.dtype) if needs[3]
                 else grad_out.new_empty(0, dtype=mask.dtype))
    empty = (x.new_empty(0), mask.new_empty(0), weight.new_empty(0))
    return (*(g if g is not None else e for g, e in zip(grads, empty)), grad_bias)


@masked_conv2d_backward_op.register_fake
def _(grad_out, x, mask, weight, geometry, group, needs):
    def like(tensor, needed, dtype=None):
        if needed:
            return torch.empty_like(tensor, dtype=dtype, memory_format=torch.contiguous_format)
        return tensor.new_empty(0, dtype=dtype)
    return (like(x, needs[0]), like(mask, needs[1]), like(weight, needs[2]),
            grad_out.new_empty((weight.shape[0],) if needs[3] else (0,), dtype=mask.dtype))


register_tap_conv_autograd(masked_conv2d_op, masked_conv2d_backward_op)


# ---------------------------------------------------------------------------------------------

def segaware_mask(emb, lam, geometry, norm="L1"):
    """exp(-|lam * Im2dist(emb)|), (N, K, Ho, Wo): the released configs' Im2dist -> Scale ->
    AbsVal -> Exp(scale -1) chain, differentiable in emb and lam with the original's rules."""
    distance = im2dist(emb, geometry.kernel, geometry.pad, geometry.stride, geometry.dilation,
                       norm=norm)
    return torch.exp(-torch.abs(distance * lam))


def _autocast_dtype(device_type):
    """The autocast dtype active for `device_type`, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def masked_conv2d(x, weight, bias=None, *, emb=None, lam=None, mask=None, kernel_size=None,
                  pad=0, stride=1, dilation=1, group=1, norm="L1"):
    """Segmentation-aware convolution without the (N, C*K, Ho*Wo) intermediates.

    y[n, o, p] = bias[o] + sum_{c, k} weight[o, c, k] * x[n, c, p + offset_k] * mask[n, k, p]

    Args:
        x: (N, C, H, W) float16 / bfloat16 / float32 / float64; N may be 0.
        weight: (O, C/group, kh, kw) of x's dtype; bias: (O,) or None.
        emb, lam: embedding (N, E, H', W') and scale (0-dim tensor or float); the mask is then
            exp(-|lam * Im2dist_norm(emb)|) with the convolution's geometry.
        mask: alternatively a precomputed (N, kh*kw, Ho, Wo) mask (exactly one of emb / mask).
        kernel_size: int or pair; defaults to weight's (must match it when given).
        pad, stride, dilation: int or (h, w) pairs. group: channel groups. norm: "L1" or "L2".
    Returns:
        (N, O, Ho, Wo) in x's dtype, Ho, Wo by the convolution rule.

    Half precision: x and weight in float16 / bfloat16 run the half kernels on CUDA (products
    in half, sums in float32; on CPU everything in float32), with the mask and the bias in
    float32 (a half mask or bias is widened). Under torch.autocast, x and a float32 weight are
    cast to the autocast dtype, as for a convolution.
    """
    check_tensor("masked_conv2d", "x", x, dim=4)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"masked_conv2d: weight must be a 4-D tensor (O, C/group, kh, kw), got "
                         f"{got}")
    if kernel_size is None:
        kernel_size = tuple(weight.shape[2:])
    geometry = ConvGeometry.of(kernel_size, pad, stride, dilation)
    if tuple(weight.shape[2:]) != geometry.kernel:
        raise ValueError(f"masked_conv2d: weight kernel {tuple(weight.shape[2:])} does not match "
                         f"kernel_size {geometry.kernel}")
    batch, channels, height, width = x.shape
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 \
            or channels % group or weight.shape[0] % group:
        raise ValueError(f"masked_conv2d: group {group} must divide the input channels {channels} "
                         f"and the outputs {weight.shape[0]}")
    if weight.shape[1] * group != channels:
        raise ValueError(f"masked_conv2d: weight has {weight.shape[1]} input channels per group; "
                         f"x has {channels} channels in {group} group(s), expected "
                         f"{channels // group}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"masked_conv2d: bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    autocast = _autocast_dtype(x.device.type) if x.dtype != torch.float64 else None
    if autocast is not None:
        x, weight = x.to(autocast), weight.to(autocast)
    dtype = x.dtype
    side = compute_dtype(dtype)        # the mask's and the bias's dtype
    for name, tensor in (("weight", weight), ("bias", bias), ("mask", mask), ("emb", emb)):
        if tensor is None:
            continue
        allowed = (dtype,) if name == "weight" else (
            (dtype,) if dtype not in HALF_DTYPES else (*HALF_DTYPES, torch.float32))
        if tensor.device != x.device or tensor.dtype not in allowed:
            expected = " or ".join(str(d) for d in allowed)
            raise ValueError(f"masked_conv2d: {name} must be {expected} on {x.device} like x, "
                             f"got {tensor.dtype} on {tensor.device}")
    out_size = geometry.check_output_size(height, width, "masked_conv2d")
    if (emb is None) == (mask is None):
        raise ValueError("masked_conv2d: give exactly one of emb (with lam) or mask")
    if emb is not None:
        if lam is None:
            raise ValueError("masked_conv2d: emb needs lam (the Scale applied to its distances)")
        check_tensor("masked_conv2d", "emb", emb, dim=4)
        if emb.shape[0] != batch or tuple(emb.shape[2:]) != (height, width):
            raise ValueError(f"masked_conv2d: emb must be (N={batch}, E, {height}, {width}) like "
                             f"x, got {tuple(emb.shape)}")
        mask = segaware_mask(emb.to(side), lam, geometry, norm)
    expected_mask = (batch, geometry.taps) + out_size
    if tuple(mask.shape) != expected_mask:
        raise ValueError(f"masked_conv2d: mask must be (N, kh*kw, Ho, Wo) = {expected_mask}, got "
                         f"{tuple(mask.shape)}")
    return masked_conv2d_op(x, mask.to(side), weight, bias.to(side) if bias is not None else None,
                            geometry.as_list(), group)
