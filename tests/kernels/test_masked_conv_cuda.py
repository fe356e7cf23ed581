"""The CUDA paths of the fused segmentation-aware convolution, run by the CPU emulation of the
kernel sources (tests/kernels/cuda_emulation.py): the implicit-GEMM kernels in every inner-product
mode against a float64 reference that rounds the operands exactly where the kernels do (so a
misplaced rounding, a wrong fragment or a wrong tile index shows at the 1e-3 level, far above the
1e-5 float32-accumulation tolerance), on ragged tiles, groups, strides and every geometry of the
released vgg config; grid-stride wrap-around; offsets beyond 2^31 elements; the band path's many
bands; the weight-gradient split."""
import re

import pytest
import torch
import torch.nn.functional as F

import segaware_caffe.kernels.masked_conv as mc
from segaware_caffe.kernels import _cuda
from segaware_caffe.kernels.geometry import ConvGeometry
from tests.kernels.cuda_emulation import emulate_cuda, library_for

MODE_DTYPES = {"simt": torch.float32, "tf32": torch.float32, "3xtf32": torch.float32,
               "bf16": torch.bfloat16, "f16": torch.float16}

# (x shape, outputs, geometry, group): tiles left ragged in M (outputs not a multiple of 64), N
# (pixels not a multiple of 128) and K (channels * taps not a multiple of the slice), groups,
# strides, non-square kernels, pads beyond the kernel reach; 32 and 64 channels per group take
# the aligned kernels (one tap per reduction slice)
RAGGED = [
    ((2, 5, 9, 11), 6, ConvGeometry.of(3, 1, 1, 1), 1),
    ((3, 4, 9, 7), 6, ConvGeometry.of(3, 2, 1, 2), 2),
    ((2, 3, 8, 9), 4, ConvGeometry.of((2, 3), (0, 1), (2, 1), (1, 1)), 1),
    ((1, 70, 6, 5), 66, ConvGeometry.of(3, 1, 1, 1), 1),
    ((2, 32, 5, 7), 64, ConvGeometry.of(3, 2, 1, 2), 1),
    ((1, 64, 5, 4), 96, ConvGeometry.of(3, 1, 1, 1), 2),
    ((1, 6, 12, 13), 3, ConvGeometry.of(5, 4, 2, 1), 3),
]

# every segmentation-aware convolution geometry of config/vgg/deploy.prototxt (kernel 3, stride
# 1; pad = dilation in 1, 2, 12), at small channel counts: 3 input channels (conv1_1, the
# per-element tap path) and 32 (the aligned path); 12 x 11 and 15 x 16 images make dilation 12
# reach outside on most taps
RELEASED = [((1, 3, 12, 11), 8, ConvGeometry.of(3, 1, 1, 1), 1),
            ((2, 32, 12, 11), 16, ConvGeometry.of(3, 1, 1, 1), 1),
            ((1, 32, 12, 11), 24, ConvGeometry.of(3, 2, 1, 2), 1),
            ((1, 32, 15, 16), 8, ConvGeometry.of(3, 12, 1, 12), 1)]


@pytest.fixture
def emulated(monkeypatch):
    """The emulation with a tiny grid (at most 2 blocks per dimension: every tile loop wraps)
    and the device queries a CPU tensor cannot answer."""
    launches = emulate_cuda(monkeypatch, max_grid=2)
    monkeypatch.setattr(_cuda, "compute_capability", lambda index: (9, 0))
    monkeypatch.setattr(_cuda, "device_index", lambda tensor: 0)
    monkeypatch.setattr(_cuda, "multiprocessors", lambda index: 2)
    return launches


def tf32(t):
    """cvt.rna.tf32.f32: round to nearest (ties away) to 10 mantissa bits, as float32."""
    bits = t.float().contiguous().view(torch.int32)
    finite = (bits & 0x7f800000) != 0x7f800000
    rounded = torch.where(finite, (bits + 0x1000) & ~0x1fff, bits)
    return rounded.view(torch.float32)


def rounding(mode):
    """What the kernel does to an operand value (a float32 / float64) before the product."""
    return {"simt": lambda t: t, "3xtf32": lambda t: t, "tf32": tf32,
            "bf16": lambda t: t.to(torch.bfloat16).float(),
            "f16": lambda t: t.to(torch.float16).float()}[mode]


def rounded_reference(x, mask, weight, bias, grad_out, geometry, group, mode):
    """Output and gradients (x, mask, weight) in float64 from the operands as the kernels form
    them: r(W) times r(x * mask) (the product in the storage's arithmetic type, then r), and so
    on for each gradient; the mask gradient's final product with x is not rounded."""
    r = rounding(mode)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, channels, height, width = x.shape
    outputs = weight.shape[0]
    taps = geometry.taps
    out_h, out_w = mask.shape[2:]
    cg, og = channels // group, outputs // group
    unfold = lambda t: F.unfold(t, geometry.kernel, geometry.dilation, geometry.pad,
                                geometry.stride).view(batch, channels, taps, out_h * out_w)
    cols = unfold(x.to(work))                                              # (N, C, K, P)
    masked = r(cols * mask.to(work).view(batch, 1, taps, -1)).double()
    w = r(weight.to(work)).double().view(group, og, cg * taps)
    g = grad_out.to(work)
    out = torch.matmul(w, masked.view(batch, group, cg * taps, -1)).view(batch, outputs, out_h,
                                                                      out_w)
    if bias is not None:
        out = out + bias.double().view(1, -1, 1, 1)
    # input gradient: dx gathers r(W) * r(g * mask) through the taps (col2im)
    g_mask = r(g.view(batch, group, og, 1, -1) * mask.to(work).view(batch, 1, 1, taps, -1))
    dcols = torch.einsum("gock,ngokp->ngckp", w.view(group, og, cg, taps), g_mask.double())
    grad_x = F.fold(dcols.reshape(batch, channels * taps, -1), (height, width), geometry.kernel,
                    geometry.dilation, geometry.pad, geometry.stride)
    # mask gradient: (r(W_k)^T r(g))[c, p] times the unrounded x of tap k, summed over c
    d = torch.einsum("gock,ngop->ngckp", w.view(group, og, cg, taps),
                     r(g).double().view(batch, group, og, -1))
    grad_mask = (d.reshape(batch, channels, taps, -1) * cols.double()).sum(1)
    # weight gradient: r(g) times r(x * mask), summed over images and pixels
    grad_w = torch.einsum("ngop,ngkp->gok", r(g).double().view(batch, group, og, -1),
                          masked.view(batch, group, cg * taps, -1))
    return (out, grad_x, grad_mask.view(batch, taps, out_h, out_w),
            grad_w.reshape(weight.shape))


def make_inputs(shape, outputs, geometry, group, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *size: torch.randn(size, generator=generator)  # noqa: E731
    side = torch.float64 if dtype == torch.float64 else torch.float32
    out_size = geometry.output_size(*shape[2:])
    x = randn(*shape).to(dtype)
    weight = randn(outputs, shape[1] // group, *geometry.kernel).to(dtype)
    bias = randn(outputs).to(side)
    mask = torch.rand((shape[0], geometry.taps, *out_size), generator=generator).to(side)
    grad_out = randn(shape[0], outputs, *out_size).to(dtype)
    return x, mask, weight, bias, grad_out


def relative_error(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_igemm(case, mode, dtype=None, tolerance=1e-5, device="cpu"):
    shape, outputs, geometry, group = case
    dtype = dtype or MODE_DTYPES[mode]
    x, mask, weight, bias, grad_out = make_inputs(shape, outputs, geometry, group, dtype)
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    out = mc._forward_igemm(*on(x, mask, weight, bias), geometry, group, mode).cpu()
    grads = [g.cpu() for g in mc._backward_igemm(*on(grad_out, x, mask, weight), geometry, group,
                                                 (True, True, True), mode)]
    expected = rounded_reference(x, mask, weight, bias, grad_out, geometry, group, mode)
    assert out.dtype == x.dtype and grads[0].dtype == x.dtype
    assert grads[1].dtype == mask.dtype and grads[2].dtype == weight.dtype
    tolerances = [tolerance] * 4
    if dtype in (torch.bfloat16, torch.float16):
        # the output, the input and the weight gradient are stored in the half type: one more
        # rounding (the mask gradient is float32)
        tolerances[0] = tolerances[1] = tolerances[3] = torch.finfo(dtype).eps
    for what, got, ref, limit in zip(("output", "grad_x", "grad_mask", "grad_weight"),
                                     (out, *grads), expected, tolerances):
        assert got.shape == ref.shape, what
        error = relative_error(got, ref)
        assert error <= limit, f"{mode} {shape}: {what} off by {error:.2e}"


@pytest.mark.parametrize("mode", list(MODE_DTYPES))
@pytest.mark.parametrize("case", RAGGED, ids=lambda c: f"{c[0]}-{c[1]}-g{c[3]}")
def test_igemm_ragged_tiles(emulated, case, mode):
    check_igemm(case, mode)


@pytest.mark.parametrize("mode", ["3xtf32", "tf32", "bf16"])
@pytest.mark.parametrize("case", RELEASED, ids=lambda c: f"C{c[0][1]}-p{c[2].pad[0]}")
def test_igemm_released_geometries(emulated, case, mode):
    check_igemm(case, mode)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("mode", list(MODE_DTYPES))
@pytest.mark.parametrize("case", RAGGED[:4] + RELEASED, ids=lambda c: f"{c[0]}-{c[1]}")
def test_igemm_on_the_gpu(case, mode):
    """The same comparison with the GPU's own mma instructions."""
    check_igemm(case, mode, device="cuda")


def test_igemm_float64_fma_is_exact(emulated):
    for case in RAGGED[:3] + RELEASED[2:3]:
        check_igemm(case, "simt", torch.float64, tolerance=1e-12)


def test_released_geometries_cover_the_vgg_config(reference):
    """RELEASED holds every (kernel, pad, stride, dilation) of the fused convolutions of
    config/vgg/deploy.prototxt."""
    text = (reference / "segaware" / "config" / "vgg" / "deploy.prototxt").read_text()
    found = set()
    for block in re.findall(r"convolution_param\s*\{([^}]*)\}", text):
        if "bottom_is_im2col: true" not in block:
            continue
        value = lambda key, default: int(re.search(rf"{key}:\s*(\d+)", block).group(1)) \
            if re.search(rf"{key}:\s*(\d+)", block) else default  # noqa: E731
        found.add(ConvGeometry.of(value("kernel_size", 1), value("pad", 0), value("stride", 1),
                                  value("dilation", 1)))
    assert found and found <= {case[2] for case in RELEASED}


def test_tile_shape_matches_the_launcher(emulated):
    for mode in MODE_DTYPES:
        dtype = MODE_DTYPES[mode]
        shape = torch.zeros(4, dtype=torch.int32)
        _cuda.launch("igemm_tile_shape", mc._igemm_code(dtype, mode), grid=(1, 1, 1),
                     block=(1, 1, 1), args=(_cuda.Typed(shape, torch.int32),),
                     like=torch.zeros(1, dtype=dtype))
        assert shape.tolist() == [mc.IGEMM_BM, mc.IGEMM_BN, mc.igemm_k_slice(dtype, mode),
                                  mc.IGEMM_THREADS], mode


def test_grid_stride_wrap_gives_the_same_numbers(monkeypatch):
    """One block per grid dimension against a grid that covers every tile: equal results."""
    shape, outputs, geometry, group = RAGGED[3]
    x, mask, weight, bias, grad_out = make_inputs(shape, outputs, geometry, group, torch.float32)
    results = []
    for max_grid in (None, 1):
        launches = emulate_cuda(monkeypatch, max_grid=max_grid)
        monkeypatch.setattr(_cuda, "multiprocessors", lambda index: 2)
        out = mc._forward_igemm(x, mask, weight, bias, geometry, group, "3xtf32")
        grads = mc._backward_igemm(grad_out, x, mask, weight, geometry, group, (True,) * 3,
                                   "3xtf32", multiprocessors=2)
        results.append((out, *grads))
        grids = [grid for _, grid, _ in launches.calls]
        assert (max(max(g) for g in grids) == 1) == (max_grid == 1)
    for full, wrapped in zip(*results):
        assert torch.equal(full, wrapped)


@pytest.mark.parametrize("multiprocessors", [1, 3, 50])
def test_weight_gradient_splits(emulated, multiprocessors):
    """More splits of the pixel reduction (partial sums added afterwards): the same gradient."""
    shape, outputs, geometry, group = (3, 8, 11, 13), 8, ConvGeometry.of(3, 1, 1, 1), 1
    x, mask, weight, bias, grad_out = make_inputs(shape, outputs, geometry, group, torch.float64)
    got = mc._backward_igemm(grad_out, x, mask, weight, geometry, group, (False, False, True),
                             "simt", multiprocessors=multiprocessors)[2]
    expected = rounded_reference(x, mask, weight, bias, grad_out, geometry, group, "simt")[3]
    assert relative_error(got, expected) <= 1e-12
    tiles, chunks = 1, 3 * -(-11 * 13 // 8)
    assert mc.weight_splits(tiles, chunks, 8 * 72 * 4, multiprocessors) == min(
        4 * multiprocessors, chunks)


# ------------------------------------------------------------------ offsets beyond 2^31 elements
# The kernels are launched as if the images were number n0, n0 + 1, ... of a huge batch: every
# per-image tensor is passed with its pointer moved back by n0 images, so the kernels index the
# small real buffers with offsets of n0 * (image size) > 2^31 elements. A 32-bit slip in any
# offset computation reads or writes elsewhere and the comparison (or the process) fails.

def first_image_beyond_2_31(*tensors):
    return max(((1 << 31) // t[0].numel()) + 1 for t in tensors)


def test_igemm_offsets_beyond_2_31(emulated):
    shape, outputs, geometry, group = (2, 3, 6, 7), 5, ConvGeometry.of(3, 1, 1, 1), 1
    x, mask, weight, bias, grad_out = make_inputs(shape, outputs, geometry, group, torch.float64)
    n0 = first_image_beyond_2_31(x, mask, grad_out)
    expected = (mc._forward_igemm(x, mask, weight, bias, geometry, group, "simt"),
                *mc._backward_igemm(grad_out, x, mask, weight, geometry, group, (True,) * 3,
                                    "simt"))
    got = (mc._forward_igemm(x, mask, weight, bias, geometry, group, "simt", images=n0),
           *mc._backward_igemm(grad_out, x, mask, weight, geometry, group, (True,) * 3, "simt",
                               images=n0))
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_band_kernels_offsets_beyond_2_31(emulated, monkeypatch):
    monkeypatch.setattr(mc, "CUDA_BAND_BYTES", 1)      # one output row per band
    shape, outputs, geometry, group = (2, 3, 6, 7), 4, ConvGeometry.of(3, 2, 1, 2), 1
    x, mask, weight, bias, grad_out = make_inputs(shape, outputs, geometry, group, torch.float64)
    n0 = first_image_beyond_2_31(x, mask)
    expected = (mc._forward_bands_cuda(x, mask, weight, bias, geometry, group),
                *mc._backward_bands_cuda(grad_out, x, mask, weight, geometry, group, (True,) * 3))
    got = (mc._forward_bands_cuda(x, mask, weight, bias, geometry, group, images=n0),
           *mc._backward_bands_cuda(grad_out, x, mask, weight, geometry, group, (True,) * 3,
                                    images=n0))
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# ---------------------------------------------------------------------------- the band path

@pytest.mark.parametrize("band_bytes", [1, 3 * 8 * 3 * 9 * 13, 1 << 30])
def test_bands_float64_many_bands(emulated, monkeypatch, band_bytes):
    """float64 on CUDA runs the band path: one-row bands, a few rows, one band; the input
    gradient kernel of each band covers only the input rows that band reads."""
    monkeypatch.setattr(mc, "CUDA_BAND_BYTES", band_bytes)
    shape, outputs, geometry, group = (3, 8, 17, 13), 6, ConvGeometry.of(3, 2, 1, 2), 2
    x, mask, weight, bias, grad_out = make_inputs(shape, outputs, geometry, group, torch.float64)
    out = mc._forward_bands_cuda(x, mask, weight, bias, geometry, group)
    grads = mc._backward_bands_cuda(grad_out, x, mask, weight, geometry, group, (True,) * 3)
    expected = rounded_reference(x, mask, weight, bias, grad_out, geometry, group, "simt")
    for got, ref in zip((out, *grads), expected):
        assert relative_error(got, ref) <= 1e-12
    grad_x_launches = [grid for name, grid, _ in emulated.calls if name == "masked_columns_grad_x"]
    bands = -(-17 // mc.band_rows(3, 8, 9, 13, 8, band_bytes))
    assert len(grad_x_launches) == bands


def test_input_rows_of_band():
    geometry = ConvGeometry.of(3, 2, 1, 2)
    # output rows [0, 1) read input rows -2, 0, 2 -> [0, 3); rows [5, 9) read 3 .. 10
    assert mc.input_rows_of_band(geometry, 9, 0, 1) == (0, 3)
    assert mc.input_rows_of_band(geometry, 9, 5, 9) == (3, 9)
    strided = ConvGeometry.of(3, 1, 2, 1)
    assert mc.input_rows_of_band(strided, 20, 3, 5) == (5, 10)


def test_emulation_reports_uneven_barriers(monkeypatch):
    """A block whose threads reach different numbers of __syncthreads is an error."""
    code = _cuda.preamble(torch.float32) + _cuda.source() + r"""
extern "C" __global__ void uneven(float* out) {
  if (threadIdx.x == 0) __syncthreads();
  out[threadIdx.x] = 1;
}
"""
    library = library_for(code)
    import ctypes
    out = torch.zeros(4)
    dims = (ctypes.c_uint * 6)(1, 1, 1, 4, 1, 1)
    assert library.emu_launch_uneven(dims, ctypes.c_void_p(out.data_ptr())) == 1
