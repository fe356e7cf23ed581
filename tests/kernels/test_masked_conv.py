"""kernels.masked_conv2d: the fused segmentation-aware convolution against the unfused Caffe
recipe written with plain torch ops (Im2col, Tile, Eltwise PROD, Conv with bottom_is_im2col),
the original's golden numbers, float64 gradcheck, band splitting, the CUDA paths (emulated on the
CPU; more in test_masked_conv_cuda.py) against the CPU path, bad inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segaware_caffe.kernels.masked_conv as masked_conv_module
from segaware_caffe.kernels import im2dist, masked_conv2d
from tests.conftest import cpu_and_cuda
from tests.kernels.cuda_emulation import emulate_cuda
from tests.kernels.layer_helpers import assert_golden_close

# (x shape, out channels, kernel, pad, stride, dilation, group)
GEOMETRIES = [
    ((1, 3, 7, 8), 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 4, 9, 7), 6, (3, 3), (2, 2), (1, 1), (2, 2), 2),
    ((2, 3, 8, 9), 4, (2, 3), (0, 1), (2, 1), (1, 1), 1),
    ((2, 2, 11, 10), 3, (3, 3), (1, 2), (2, 2), (1, 2), 1),
    ((1, 4, 6, 5), 4, (1, 1), (0, 0), (1, 1), (1, 1), 4),
    # dilated taps reaching past the image (the released fc6 at small sizes): whole taps outside
    ((2, 2, 4, 5), 3, (3, 3), (6, 6), (1, 1), (6, 6), 1),
]


def unfused_masked_conv(x, weight, bias, mask, kernel, pad, stride, dilation, group):
    """The released recipe, step by step, with its full-size intermediates."""
    batch, channels = x.shape[:2]
    taps = kernel[0] * kernel[1]
    out_h, out_w = mask.shape[2:]
    columns = F.unfold(x, kernel, dilation, pad, stride)                       # Im2col
    tiled = mask.repeat(1, channels, 1, 1).reshape(batch, channels * taps, -1)  # Tile axis 1
    hit = columns * tiled                                                       # Eltwise PROD
    num_output = weight.shape[0]
    weight_groups = weight.reshape(group, num_output // group, -1)              # Conv im2col
    out = torch.matmul(weight_groups, hit.view(batch, group, -1, out_h * out_w))
    out = out.reshape(batch, num_output, out_h, out_w)
    return out + bias.view(1, -1, 1, 1) if bias is not None else out


def unfused_mask(emb, lam, kernel, pad, stride, dilation):
    """Im2dist L1 -> Scale(lam) -> AbsVal -> Exp(scale -1)."""
    return torch.exp(-torch.abs(im2dist(emb, kernel, pad, stride, dilation, norm="L1") * lam))


def make_case(geometry_case, dtype, device, contiguous, seed=0, bias=True):
    shape, num_output, kernel, pad, stride, dilation, group = geometry_case
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *size: torch.randn(size, generator=generator, dtype=torch.float64).to(dtype)
    x = randn(*shape)
    emb = randn(shape[0], 3, *shape[2:])
    emb[:, :, 2] = emb[:, :, 1]           # exact ties: the L1 / AbsVal sign(0) = 0 rules matter
    weight = randn(num_output, shape[1] // group, *kernel)
    tensors = {"x": x, "emb": emb, "weight": weight,
               "bias": randn(num_output) if bias else None,
               "lam": torch.tensor(0.3, dtype=dtype)}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        tensor = tensor.to(device)
        if not contiguous and tensor.dim() == 4:
            tensor = tensor.transpose(2, 3).contiguous().transpose(2, 3)
        tensors[name] = tensor.requires_grad_(True)
    geometry = dict(kernel_size=kernel, pad=pad, stride=stride, dilation=dilation, group=group)
    return tensors, geometry


def run_both(tensors, geometry, grad_seed=1):
    """(fused outputs and grads, unfused outputs and grads) for one random top gradient."""
    names = [n for n, t in tensors.items() if t is not None]
    fused = masked_conv2d(tensors["x"], tensors["weight"], tensors["bias"], emb=tensors["emb"],
                          lam=tensors["lam"], **geometry)
    kernel, pad, stride, dilation, group = (geometry[k] for k in
                                            ("kernel_size", "pad", "stride", "dilation", "group"))
    mask = unfused_mask(tensors["emb"], tensors["lam"], kernel, pad, stride, dilation)
    unfused = unfused_masked_conv(tensors["x"], tensors["weight"], tensors["bias"], mask, kernel,
                                  pad, stride, dilation, group)
    grad_out = torch.randn(fused.shape, generator=torch.Generator().manual_seed(grad_seed),
                           dtype=torch.float64).to(dtype=fused.dtype, device=fused.device)
    inputs = [tensors[n] for n in names]
    fused_grads = torch.autograd.grad(fused, inputs, grad_out)
    unfused_grads = torch.autograd.grad(unfused, inputs, grad_out)
    return names, (fused, fused_grads), (unfused, unfused_grads)


def assert_relative_close(got, ref, rel, what):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    scale = ref.abs().max().item() or 1.0
    error = (got - ref).abs().max().item() / scale
    assert error <= rel, f"{what}: max error {error:.3g} of max|ref| {scale:.3g} > {rel}"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_matches_unfused_recipe(device, dtype, contiguous, geometry_case):
    tensors, geometry = make_case(geometry_case, dtype, device, contiguous)
    names, (fused, fused_grads), (unfused, unfused_grads) = run_both(tensors, geometry)
    assert fused.dtype == dtype and fused.device == tensors["x"].device
    assert_relative_close(fused, unfused, 1e-5, "output")
    for name, got, ref in zip(names, fused_grads, unfused_grads):
        assert_relative_close(got, ref, 1e-4, f"gradient of {name}")


@pytest.mark.parametrize("rows_budget", [1, 3])
def test_bands_of_any_height_give_the_same_result(monkeypatch, rows_budget):
    geometry_case = GEOMETRIES[3]
    tensors, geometry = make_case(geometry_case, torch.float64, "cpu", True)
    shape, _, kernel = geometry_case[:3]
    out_w = (shape[3] + 2 * geometry["pad"][1] - (geometry["dilation"][1] * (kernel[1] - 1) + 1)) \
        // geometry["stride"][1] + 1
    row_bytes = shape[0] * shape[1] * kernel[0] * kernel[1] * out_w * 8
    monkeypatch.setattr(masked_conv_module, "CPU_BAND_BYTES", rows_budget * row_bytes)
    names, (fused, fused_grads), (unfused, unfused_grads) = run_both(tensors, geometry)
    assert_relative_close(fused, unfused, 1e-12, "output")
    for name, got, ref in zip(names, fused_grads, unfused_grads):
        assert_relative_close(got, ref, 1e-12, f"gradient of {name}")


def test_without_bias_and_with_precomputed_mask():
    tensors, geometry = make_case(GEOMETRIES[1], torch.float64, "cpu", True, bias=False)
    kernel, pad, stride, dilation = (geometry[k]
                                     for k in ("kernel_size", "pad", "stride", "dilation"))
    mask = torch.rand(3, 9, *tensors["x"].shape[2:], dtype=torch.float64, requires_grad=True)
    fused = masked_conv2d(tensors["x"], tensors["weight"], None, mask=mask, **geometry)
    unfused = unfused_masked_conv(tensors["x"], tensors["weight"], None, mask, kernel, pad, stride,
                                  dilation, geometry["group"])
    assert_relative_close(fused, unfused, 1e-12, "output")
    inputs = (tensors["x"], tensors["weight"], mask)
    for got, ref in zip(torch.autograd.grad(fused.sum(), inputs),
                        torch.autograd.grad(unfused.sum(), inputs)):
        assert_relative_close(got, ref, 1e-12, "gradient")


@pytest.mark.parametrize("geometry_case", GEOMETRIES[:4])
def test_gradcheck_in_x_mask_weight_bias(geometry_case):
    """The fused op is linear in each of x, mask, weight and bias: its backward is exact."""
    shape, num_output, kernel, pad, stride, dilation, group = geometry_case
    shape = (min(shape[0], 2), shape[1], min(shape[2], 6), min(shape[3], 5))
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out_h = (shape[2] + 2 * pad[0] - (dilation[0] * (kernel[0] - 1) + 1)) // stride[0] + 1
    out_w = (shape[3] + 2 * pad[1] - (dilation[1] * (kernel[1] - 1) + 1)) // stride[1] + 1
    mask = torch.rand(shape[0], kernel[0] * kernel[1], out_h, out_w, dtype=torch.float64,
                      requires_grad=True)
    weight = torch.randn(num_output, shape[1] // group, *kernel, dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(num_output, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: masked_conv2d(t[0], t[2], t[3], mask=t[1], kernel_size=kernel, pad=pad,
                                 stride=stride, dilation=dilation, group=group),
        (x, mask, weight, bias), fast_mode=True)


def test_golden_segaware_conv(golden):
    """config/vgg's pattern as the original computed it: output, and gradients of x, the
    embedding, lambda, W and b."""
    data = np.load(golden / "layers" / "segaware_conv" / "data.npz")
    tensor = lambda key: torch.from_numpy(np.array(data[key])).requires_grad_(True)
    x, emb = tensor("in/x"), tensor("in/emb")
    lam = tensor("param/weighted_emb_dist1_1/0")
    weight, bias = tensor("param/conv1_1/0"), tensor("param/conv1_1/1")
    out = masked_conv2d(x, weight, bias, emb=emb, lam=lam, kernel_size=3, pad=1)
    golden = {"output": (out, "out/conv1_1")}
    out.backward(torch.from_numpy(data["topdiff/conv1_1"].copy()))
    golden.update({"x": (x.grad, "diff/x"), "emb": (emb.grad, "diff/emb"),
                   "lambda": (lam.grad, "paramdiff/weighted_emb_dist1_1/0"),
                   "W": (weight.grad, "paramdiff/conv1_1/0"),
                   "b": (bias.grad, "paramdiff/conv1_1/1")})
    for what, (got, key) in golden.items():
        assert_golden_close(got, data[key], what)


@pytest.mark.parametrize("geometry_case", GEOMETRIES)
@pytest.mark.parametrize("path", ["bands", "bands-1-row", "igemm"])
def test_cuda_source_matches_cpu_path(monkeypatch, geometry_case, path):
    """The CUDA paths in float64 (the band kernels with cuBLAS-style products, also with
    one-row bands; the implicit GEMM with FMA tiles), run by the CPU emulation on a grid of at
    most 2 blocks per dimension, against the CPU path."""
    emulate_cuda(monkeypatch, max_grid=2)
    if path == "bands-1-row":
        monkeypatch.setattr(masked_conv_module, "CUDA_BAND_BYTES", 1)
    monkeypatch.setattr(masked_conv_module, "CUDA_IMPL", "igemm" if path == "igemm" else "bands")
    monkeypatch.setattr(masked_conv_module._cuda, "compute_capability", lambda index: (9, 0))
    monkeypatch.setattr(masked_conv_module._cuda, "device_index", lambda tensor: 0)
    monkeypatch.setattr(masked_conv_module._cuda, "multiprocessors", lambda index: 2)
    tensors, geometry = make_case(geometry_case, torch.float64, "cpu", True)
    x, weight, bias = (tensors[k].detach() for k in ("x", "weight", "bias"))
    kernel, pad, stride, dilation, group = (geometry[k] for k in
                                            ("kernel_size", "pad", "stride", "dilation", "group"))
    patch = masked_conv_module.ConvGeometry.of(kernel, pad, stride, dilation)
    mask = unfused_mask(tensors["emb"].detach(), 0.3, kernel, pad, stride, dilation)
    torch.testing.assert_close(
        masked_conv_module._forward_cuda(x, mask, weight, bias, patch, group),
        masked_conv_module._forward_cpu(x, mask, weight, bias, patch, group))
    grad_out = torch.randn(x.shape[0], weight.shape[0], *mask.shape[2:], dtype=torch.float64)
    needs = (True, True, True)
    for emulated, reference in zip(
            masked_conv_module._backward_cuda(grad_out, x, mask, weight, patch, group, needs),
            masked_conv_module._backward_cpu(grad_out, x, mask, weight, patch, group, needs)):
        torch.testing.assert_close(emulated, reference)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_cuda_matches_cpu(geometry_case):
    results = []
    for device in ("cpu", "cuda"):
        tensors, geometry = make_case(geometry_case, torch.float64, device, True)
        names, (fused, grads), _ = run_both(tensors, geometry)
        results.append([fused.detach().cpu()] + [g.cpu() for g in grads])
    for cpu_value, cuda_value in zip(*results):
        torch.testing.assert_close(cuda_value, cpu_value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("change, error, message", [
    (dict(mask=None), ValueError, "exactly one of emb"),
    (dict(emb="emb"), ValueError, "exactly one of emb"),
    (dict(weight=torch.zeros(4, 3, 3)), ValueError, "weight must be a 4-D tensor"),
    (dict(kernel_size=5), ValueError,
     r"weight kernel \(3, 3\) does not match kernel_size \(5, 5\)"),
    (dict(group=2), ValueError, "group 2 must divide the input channels 3"),
    (dict(weight=torch.zeros(4, 2, 3, 3)), ValueError, "weight has 2 input channels per group"),
    (dict(bias=torch.zeros(3)), ValueError, r"bias must have shape \(4,\)"),
    (dict(mask=torch.zeros(1, 9, 6, 6)), ValueError, r"mask must be .* = \(1, 9, 5, 5\)"),
    (dict(mask=torch.zeros(1, 9, 5, 5, dtype=torch.float64)), ValueError,
     "mask must be torch.float32 on cpu like x, got torch.float64"),
    (dict(weight=torch.zeros(4, 3, 3, 3, dtype=torch.bfloat16)), ValueError,
     "weight must be torch.float32 on cpu like x, got torch.bfloat16"),
    (dict(x=torch.zeros(1, 3, 5)), ValueError, "x must be 4-D"),
])
def test_rejects_bad_inputs(change, error, message):
    arguments = dict(x=torch.zeros(1, 3, 5, 5), weight=torch.zeros(4, 3, 3, 3), bias=torch.zeros(4),
                     mask=torch.zeros(1, 9, 5, 5), pad=1)
    arguments.update(change)
    if arguments.get("emb") == "emb":
        arguments.update(emb=torch.zeros(1, 2, 5, 5), lam=0.5)
    with pytest.raises(error, match=message):
        masked_conv2d(**arguments)


def test_emb_needs_lambda_and_matching_size():
    x, weight = torch.zeros(1, 3, 5, 5), torch.zeros(4, 3, 3, 3)
    with pytest.raises(ValueError, match="emb needs lam"):
        masked_conv2d(x, weight, emb=torch.zeros(1, 2, 5, 5), pad=1)
    with pytest.raises(ValueError, match=r"emb must be \(N=1, E, 5, 5\)"):
        masked_conv2d(x, weight, emb=torch.zeros(1, 2, 4, 5), lam=0.1, pad=1)


@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_cpu_columns_are_the_zero_padded_im2col_times_the_mask(geometry_case):
    """The CPU band columns, built without a padded copy, are the padded input's taps times the
    mask element for element: a pixel outside the image is 0 * mask, so a mask that is not
    finite there gives NaN as the original's product does."""
    from segaware_caffe.kernels.geometry import ConvGeometry, pad_input, patch_view, tap_offsets
    shape, _, kernel, pad, stride, dilation, _ = geometry_case
    geometry = ConvGeometry(kernel, pad, stride, dilation)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    out_h, out_w = geometry.output_size(*shape[2:])
    mask = torch.rand(shape[0], geometry.taps, out_h, out_w, generator=gen, dtype=torch.float64)
    mask[0, 0, 0, 0], mask[-1, -1, -1, -1] = float("nan"), float("inf")
    mask[0, geometry.taps // 2, out_h // 2, out_w // 2] = float("inf")
    padded = pad_input(x, geometry)
    expected = torch.stack([patch_view(padded, oh, ow, (out_h, out_w), geometry.stride)
                            * mask[:, k].unsqueeze(1)
                            for k, (_, _, oh, ow) in enumerate(tap_offsets(geometry))], 2)
    for start, end in ((0, out_h), (1, out_h)):
        columns = torch.empty(shape[0], shape[1], geometry.taps, end - start, out_w,
                              dtype=torch.float64)
        masked_conv_module._masked_columns_cpu(x, mask, geometry, start, end, columns)
        torch.testing.assert_close(columns, expected[:, :, :, start:end], rtol=0, atol=0,
                                   equal_nan=True)


# float32 CPU cases of 128+ columns per output (one group): the pixel-major bands
PIXEL_GEOMETRIES = [
    ((1, 16, 9, 10), 24, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 20, 11, 9), 16, (3, 3), (2, 2), (1, 1), (2, 2), 1),
    ((2, 16, 10, 11), 17, (3, 3), (1, 1), (2, 2), (1, 1), 1),
    ((1, 16, 5, 6), 8, (3, 3), (6, 6), (1, 1), (6, 6), 1),       # taps wholly outside
    ((1, 8, 9, 8), 12, (5, 5), (2, 1), (1, 2), (1, 1), 1),
    ((2, 35, 7, 9), 16, (2, 3), (0, 1), (2, 1), (1, 1), 1),      # channels not a multiple of 16
]
PIXEL_MAJOR = pytest.mark.skipif(
    not masked_conv_module.pixel_major_applies(torch.ones(1, 16, 3, 3), torch.ones(4, 16, 3, 3), 1),
    reason="needs oneDNN and the compiled CPU loops")


def _float64_reference(tensors, geometry, grad_seed=1):
    """The unfused recipe in float64 on the same values: output and gradients."""
    double = {n: (t.detach().double().requires_grad_(True) if t is not None else None)
              for n, t in tensors.items()}
    _, _, (out, grads) = run_both(double, geometry, grad_seed)
    return out, grads


@PIXEL_MAJOR
@pytest.mark.parametrize("band_bytes", [None, 30000])
@pytest.mark.parametrize("geometry_case", PIXEL_GEOMETRIES)
def test_pixel_major_bands_match_the_recipe(monkeypatch, geometry_case, band_bytes):
    """Forward and every gradient of the pixel-major bands against the float64 recipe, at
    float32 accuracy, in one band and in bands of a few rows."""
    if band_bytes is not None:
        monkeypatch.setattr(masked_conv_module, "CPU_BAND_BYTES", band_bytes)
    tensors, geometry = make_case(geometry_case, torch.float32, "cpu", True)
    assert masked_conv_module.pixel_major_applies(tensors["x"], tensors["weight"], 1)
    calls = []
    for name in ("_forward_pixel_major_cpu", "_backward_pixel_major_cpu"):
        original = getattr(masked_conv_module, name)
        monkeypatch.setattr(masked_conv_module, name,
                            lambda *a, _f=original: calls.append(_f) or _f(*a))
    names, (fused, fused_grads), _ = run_both(tensors, geometry)
    assert len(calls) == 2, "the pixel-major forward and backward ran"
    out, grads = _float64_reference(tensors, geometry)
    assert fused.is_contiguous()
    assert_relative_close(fused, out, 1e-5, "output")
    for name, got, ref in zip(names, fused_grads, grads):
        assert got.is_contiguous(), name
        assert_relative_close(got, ref, 1e-4, f"gradient of {name}")


@PIXEL_MAJOR
@pytest.mark.parametrize("wanted", [("x",), ("weight",), ("weight", "bias"), ("emb",)])
def test_pixel_major_backward_of_some_inputs(monkeypatch, wanted):
    """Only some gradients asked for (and the column gradients by torch.mm instead of oneDNN):
    those, as the recipe's."""
    monkeypatch.setattr(masked_conv_module, "GRAD_COLUMNS_ONEDNN", wanted != ("x",))
    tensors, geometry = make_case(PIXEL_GEOMETRIES[1], torch.float32, "cpu", True)
    for name, tensor in tensors.items():
        if tensor is not None and name not in wanted:
            tensor.requires_grad_(False)
    fused = masked_conv2d(tensors["x"], tensors["weight"], tensors["bias"], emb=tensors["emb"],
                          lam=tensors["lam"], **geometry)
    grad_out = torch.randn(fused.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).float()      # run_both's
    got = torch.autograd.grad(fused, [tensors[n] for n in wanted], grad_out)
    out, grads = _float64_reference(tensors, geometry)
    names = [n for n, t in tensors.items() if t is not None]
    for name, value in zip(wanted, got):
        assert_relative_close(value, grads[names.index(name)], 1e-4, f"gradient of {name}")


@PIXEL_MAJOR
def test_a_refused_pixel_major_product_runs_the_row_major_bands(monkeypatch):
    tensors, geometry = make_case(PIXEL_GEOMETRIES[0], torch.float32, "cpu", True)
    args = (tensors["x"], tensors["weight"], tensors["bias"])
    expected = masked_conv2d(*args, emb=tensors["emb"], lam=tensors["lam"], **geometry)

    def refuse(*args, **kwargs):
        raise RuntimeError("could not create a primitive")
    monkeypatch.setattr(masked_conv_module.PackedPointwise, "__call__", refuse)
    monkeypatch.setattr(masked_conv_module, "PIXEL_MAJOR", False)
    row_major = masked_conv2d(*args, emb=tensors["emb"], lam=tensors["lam"], **geometry)
    monkeypatch.setattr(masked_conv_module, "PIXEL_MAJOR", True)
    refused = masked_conv2d(*args, emb=tensors["emb"], lam=tensors["lam"], **geometry)
    torch.testing.assert_close(refused, row_major, rtol=0, atol=0)
    assert_relative_close(expected, row_major, 1e-5, "pixel-major vs row-major")
    # a refused column-gradient product: torch.mm's
    monkeypatch.setattr(masked_conv_module.PackedPointwise, "add_into", refuse)
    names, (fused, fused_grads), _ = run_both(tensors, geometry)
    out, grads = _float64_reference(tensors, geometry)
    for name, got, ref in zip(names, fused_grads, grads):
        assert_relative_close(got, ref, 1e-4, f"gradient of {name}")
