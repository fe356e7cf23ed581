"""The compiled CPU loops (kernels/_native.py, kernels/cpu/*.c): they build with the machine's C
compiler, compute what the torch code beside them computes, and their absence (no compiler, a
failed build, switched off) leaves the torch code running with the same numbers."""
import contextlib
import importlib
import shutil
import subprocess
import sys

import pytest
import torch

import segaware_caffe.kernels._native as native
import segaware_caffe.kernels.masked_conv as masked_conv_module
import segaware_caffe.kernels.meanfield as meanfield_module
from segaware_caffe.kernels import masked_conv2d
from segaware_caffe.kernels.geometry import ConvGeometry
from tests.kernels.test_masked_conv import GEOMETRIES

HAVE_COMPILER = native._compiler() is not None
NEEDS_COMPILER = pytest.mark.skipif(
    not HAVE_COMPILER or not native.ENABLED,
    reason="no C compiler (cc, gcc, clang)" if not HAVE_COMPILER else "compiled loops switched off "
    "(SEGAWARE_NATIVE_CPU=0)")


@contextlib.contextmanager
def torch_threads(count):
    """torch's intra-op thread count set to `count` for the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def fresh_builds(monkeypatch, tmp_path):
    """Builds into an empty cache folder, forgetting the libraries loaded so far."""
    monkeypatch.setenv("SEGAWARE_CACHE", str(tmp_path))
    native._library.cache_clear()
    native._failures.clear()
    yield tmp_path / "cpu"
    native._library.cache_clear()
    native._failures.clear()


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_builds_where_a_compiler_exists(fresh_builds, dtype):
    loop = native.function("masked_conv.c", "masked_columns", dtype)
    assert loop is not None, native.status()
    built = list(fresh_builds.glob("masked_conv-*.so"))
    assert len(built) == 1 and ("float" if dtype == torch.float32 else "double") in built[0].name
    # a second process loads the cached library instead of compiling again
    stamp = built[0].stat().st_mtime_ns
    code = ("import torch, segaware_caffe.kernels._native as n; "
            f"assert n.function('masked_conv.c', 'masked_columns', torch.{str(dtype)[6:]})")
    subprocess.run([sys.executable, "-c", code], check=True, env={
        **__import__("os").environ, "SEGAWARE_CACHE": str(fresh_builds.parent)})
    assert [p.stat().st_mtime_ns for p in fresh_builds.glob("masked_conv-*.so")] == [stamp]
    assert not list(fresh_builds.glob(".build-*")), "a build folder was left behind"


@NEEDS_COMPILER
def test_every_source_builds_every_function(fresh_builds):
    """Each source of kernels/cpu, for both dtypes: the tests that compare a compiled loop with
    the torch code would otherwise pass on the torch code alone where a build broke."""
    for source, functions in native.SIGNATURES.items():
        for dtype in (torch.float32, torch.float64):
            for name in functions:
                assert native.function(source, name, dtype) is not None, native.status()
    assert sorted(p.name for p in native.SOURCE_DIR.glob("*.c")) == sorted(native.SIGNATURES)


def test_a_failed_build_falls_back_to_torch_and_says_why(fresh_builds, monkeypatch):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` command to stand for a broken compiler")
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setenv("CC", false)
    assert native.function("masked_conv.c", "masked_columns", torch.float32) is None
    (why,) = native.status().values()
    assert "-O3" in why
    x, mask = torch.randn(1, 3, 7, 8), torch.rand(1, 9, 7, 8)
    weight, bias = torch.randn(5, 3, 3, 3), torch.randn(5)
    out = masked_conv2d(x, weight, bias, mask=mask, pad=1)
    monkeypatch.delenv("CC")
    native._library.cache_clear()
    monkeypatch.setattr(native, "ENABLED", False)
    torch.testing.assert_close(out, masked_conv2d(x, weight, bias, mask=mask, pad=1), rtol=0,
                               atol=0)


def _columns(x, mask, geometry, start, end, compiled):
    columns = torch.full((x.shape[0], x.shape[1], geometry.taps, end - start, mask.shape[3]),
                         123.0, dtype=x.dtype)
    if compiled:
        assert masked_conv_module._masked_columns_native(x, mask, geometry, start, end, columns)
    else:
        masked_conv_module._masked_columns_cpu(x, mask, geometry, start, end, columns)
    return columns


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_compiled_columns_equal_the_torch_columns(geometry_case, dtype):
    """Element for element, including 0 * mask outside the image where the mask is NaN / inf,
    for whole images and for bands that start and end inside."""
    shape, _, kernel, pad, stride, dilation, _ = geometry_case
    geometry = ConvGeometry(kernel, pad, stride, dilation)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    out_h, out_w = geometry.output_size(*shape[2:])
    mask = torch.rand(shape[0], geometry.taps, out_h, out_w, generator=gen, dtype=dtype)
    mask[0, 0, 0, 0], mask[-1, -1, -1, -1] = float("nan"), float("inf")
    x[0, 0, 0, 0] = float("inf")
    for start, end in ((0, out_h), (1, out_h), (0, max(1, out_h - 1)), (out_h // 2, out_h // 2 + 1)):
        torch.testing.assert_close(_columns(x, mask, geometry, start, end, True),
                                   _columns(x, mask, geometry, start, end, False),
                                   rtol=0, atol=0, equal_nan=True)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnormal_products_become_zeros_of_their_sign(dtype):
    tiny = torch.finfo(dtype).tiny
    geometry = ConvGeometry((1, 1))
    x = torch.tensor([1.0, -1.0, 3.0, -2.0, 1e-3, 0.0], dtype=dtype).view(1, 1, 1, 6)
    mask = torch.tensor([tiny / 4, tiny / 4, tiny, tiny, tiny * 1e-3, float("nan")],
                        dtype=dtype).view(1, 1, 1, 6)
    columns = _columns(x, mask, geometry, 0, 1, True).flatten()
    expected = torch.tensor([0.0, -0.0, 3 * tiny, -2 * tiny, 0.0, float("nan")], dtype=dtype)
    torch.testing.assert_close(columns, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(columns[:2]), torch.tensor([False, True])), "a sign was lost"


@NEEDS_COMPILER
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_thread_count_does_not_change_the_result(threads):
    geometry = ConvGeometry((3, 3), (1, 1))
    x, mask = torch.randn(2, 5, 9, 11), torch.rand(2, 9, 9, 11)
    reference = _columns(x, mask, geometry, 2, 7, False)
    with torch_threads(threads):
        compiled = _columns(x, mask, geometry, 2, 7, True)
    torch.testing.assert_close(compiled, reference, rtol=0, atol=0)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_pixel_major_columns_are_the_columns_reordered(geometry_case, dtype):
    """The pixel-major loop (channels_last x) writes the compiled columns' values, bit for bit
    (NaN / inf masks, an infinite pixel, flushed products), in (N, rows, Wo, taps, C) order."""
    shape, _, kernel, pad, stride, dilation, _ = geometry_case
    geometry = ConvGeometry(kernel, pad, stride, dilation)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    out_h, out_w = geometry.output_size(*shape[2:])
    mask = torch.rand(shape[0], geometry.taps, out_h, out_w, generator=gen, dtype=dtype)
    mask[0, 0, 0, 0], mask[-1, -1, -1, -1] = float("nan"), float("inf")
    mask[0, -1, -1, 0] = torch.finfo(dtype).tiny / 8
    x[0, 0, 0, 0] = float("inf")
    x_last = x.contiguous(memory_format=torch.channels_last)
    for start, end in ((0, out_h), (1, out_h), (out_h // 2, out_h // 2 + 1)):
        expected = _columns(x, mask, geometry, start, end, True).permute(0, 3, 4, 2, 1)
        got = torch.full_like(expected, 123.0).contiguous()
        assert masked_conv_module.masked_pixel_columns_cpu(x_last, mask, geometry, start, end,
                                                           got)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    # a standard-layout x is refused (the caller converts it)
    if shape[1] > 1 and shape[2] * shape[3] > 1:
        assert not masked_conv_module.masked_pixel_columns_cpu(x, mask, geometry, 0, out_h, got)


@pytest.mark.parametrize("activation", [None, 0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_band_loop_writes_a_channels_last_top(activation, dtype, monkeypatch):
    """With channels_last (one group), the top is in channels_last memory and holds the
    op's output followed by the activation (a transposed product: float rounding only)."""
    monkeypatch.setattr(masked_conv_module, "CPU_BAND_BYTES", 4096)
    gen = torch.Generator().manual_seed(2)
    geometry = ConvGeometry((3, 3), (1, 1), (2, 1), (1, 1))
    x = torch.randn(2, 3, 13, 12, generator=gen, dtype=dtype)
    out_h, out_w = geometry.output_size(13, 12)
    mask = torch.rand(2, 9, out_h, out_w, generator=gen, dtype=dtype)
    weight = torch.randn(5, 3, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(5, generator=gen, dtype=dtype)
    expected = masked_conv2d(x, weight, bias, mask=mask, pad=1, stride=(2, 1))
    if activation is not None:
        expected = torch.nn.functional.leaky_relu(expected, activation)
    out = masked_conv_module.masked_conv2d_inference(x, mask, weight, bias, geometry, 1,
                                                     activation, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("activation", [None, 0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_inference_call_is_the_op_and_its_activation(activation, dtype, monkeypatch):
    """masked_conv2d_inference (bias and ReLU / leaky ReLU applied band by band) gives exactly
    the op's output followed by the activation, with bands shorter than the image."""
    monkeypatch.setattr(masked_conv_module, "CPU_BAND_BYTES", 4096)
    gen = torch.Generator().manual_seed(1)
    geometry = ConvGeometry((3, 3), (2, 2), (1, 1), (2, 2))
    x = torch.randn(2, 4, 13, 12, generator=gen, dtype=dtype)
    mask = torch.rand(2, 9, 13, 12, generator=gen, dtype=dtype)
    weight = torch.randn(6, 2, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(6, generator=gen, dtype=dtype)
    expected = masked_conv2d(x, weight, bias, mask=mask, pad=2, dilation=2, group=2)
    if activation is not None:
        expected = torch.nn.functional.leaky_relu(expected, activation)
    for _ in range(2):      # the second call reuses the kept band buffer
        out = masked_conv_module.masked_conv2d_inference(x, mask, weight, bias, geometry, 2,
                                                         activation)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_compiled_backward_equals_the_torch_backward(geometry_case, dtype, monkeypatch):
    """grad_x, grad_mask and grad_weight of the band loop with the compiled loops against the
    torch loops, with bands shorter than the image and non-finite column gradients."""
    shape, num_output, kernel, pad, stride, dilation, group = geometry_case
    geometry = ConvGeometry(kernel, pad, stride, dilation)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    out_h, out_w = geometry.output_size(*shape[2:])
    mask = torch.rand(shape[0], geometry.taps, out_h, out_w, generator=gen, dtype=dtype)
    weight = torch.randn(num_output, shape[1] // group, *kernel, generator=gen, dtype=dtype)
    grad_out = torch.randn(shape[0], num_output, out_h, out_w, generator=gen, dtype=dtype)
    grad_out[0, 0, 0, 0] = float("inf")
    monkeypatch.setattr(masked_conv_module, "CPU_BAND_BYTES",
                        shape[0] * shape[1] * geometry.taps * out_w * x.element_size() * 2)
    results = {}
    for compiled in (True, False):
        monkeypatch.setattr(native, "ENABLED", compiled)
        results[compiled] = masked_conv_module._backward_cpu(grad_out, x, mask, weight, geometry,
                                                             group, (True, True, True))
    for name, a, b in zip(("grad_x", "grad_mask", "grad_weight"), results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", [
    ConvGeometry((3, 2), (1, 0), (2, 1), (2, 1)), ConvGeometry((5, 5), (1, 1), (2, 2)),
    ConvGeometry((3, 3), (1, 1)), ConvGeometry((3, 3), (0, 0), (1, 1), (0, 0)),   # dilation 0
    ConvGeometry((13, 13), (54, 54), (1, 1), (9, 9))])      # the released bilateral message
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_crf_message_equals_the_torch_loop(geometry, dtype, threads, monkeypatch):
    """Bit for bit (the same fused multiply-adds in tap order), with NaN in the attention."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 12, 11, generator=gen, dtype=dtype)
    out_h, out_w = geometry.output_size(12, 11)
    attention = torch.rand(2, geometry.taps, out_h, out_w, generator=gen, dtype=dtype)
    attention[1, 0, 0, 0] = float("nan")
    with torch_threads(threads):
        compiled = meanfield_module._message_forward_cpu(q, attention, geometry)
        monkeypatch.setattr(native, "ENABLED", False)
        expected = meanfield_module._message_forward_cpu(q, attention, geometry)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=0, equal_nan=True)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel,pad,stride", [((3, 3), (1, 1), (2, 2)), ((2, 2), (0, 0), (2, 2)),
                                               ((3, 2), (1, 0), (1, 2)), ((5, 5), (2, 2), (3, 3)),
                                               ((7, 7), (3, 3), (1, 1))])
def test_compiled_max_pooling_equals_the_tap_maxima(kernel, pad, stride, dtype):
    """Caffe's windows clipped to the image, -FLT_MAX for a window with nothing inside (the
    last windows of a ceil-rounded output), NaN where a window holds one."""
    from segaware_caffe.inference import compiled_pool, tap_max_pool
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 17, 11, 9, generator=gen, dtype=dtype)   # 16+: compiled in channels_last
    x[0, 1, 4, 4] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    out = tuple(-(-(size + 2 * p - k) // s) + 1 for size, k, p, s in
                zip((11, 9), kernel, pad, stride))      # Caffe's ceil rule
    expected = tap_max_pool(x, kernel, pad, stride, out)
    got = compiled_pool("max_pool", x, kernel, pad, stride, out, fallback=None)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    # channels_last in, channels_last out
    last = compiled_pool("max_pool", x.contiguous(memory_format=torch.channels_last), kernel,
                         pad, stride, out, fallback=None)
    assert last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last, expected, rtol=0, atol=0, equal_nan=True)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_l1", [True, False])
@pytest.mark.parametrize("kernel,dilation,channels", [((3, 3), (1, 1), 64), ((5, 3), (2, 1), 3),
                                                      ((7, 7), (1, 1), 2), ((3, 5), (3, 2), 5)])
def test_compiled_same_geometry_distances_equal_the_torch_loop(kernel, dilation, channels,
                                                               norm_l1, dtype, monkeypatch):
    """Im2dist's 'same' geometry: the compiled channel sums against the torch loop's, with
    neighbours beyond the image, removed centre and bounds, and non-finite entries (the sums'
    order may differ from torch's reduction: float rounding)."""
    im2dist_module = importlib.import_module("segaware_caffe.kernels.im2dist")
    pad = ((kernel[0] // 2) * dilation[0], (kernel[1] // 2) * dilation[1])
    geometry = ConvGeometry(kernel, pad, (1, 1), dilation)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, channels, 9, 11, generator=gen, dtype=dtype)
    x[0, 0, 1, 2], x[1, -1, -1, 0] = float("inf"), float("nan")
    for remove in (False, True):
        args = (x, geometry, norm_l1, remove, remove)
        compiled = im2dist_module._forward_cpu_same(*args)
        with monkeypatch.context() as patch:
            patch.setattr(native, "ENABLED", False)
            expected = im2dist_module._forward_cpu_same(*args)
        tolerance = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(compiled, expected, rtol=tolerance, atol=tolerance,
                                   equal_nan=True)
        assert torch.equal(torch.isnan(compiled), torch.isnan(expected))


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel,pad,stride,round_mode", [
    ((3, 3), (0, 0), (2, 2), 0), ((3, 3), (1, 1), (2, 2), 0), ((2, 2), (0, 0), (2, 2), 0),
    ((3, 2), (1, 0), (1, 2), 1), ((5, 5), (2, 2), (3, 3), 0), ((3, 3), (1, 1), (1, 1), 0)])
def test_compiled_training_max_pooling_is_the_torch_path(kernel, pad, stride, round_mode, dtype,
                                                         monkeypatch):
    """Training MAX pooling (top, winners' positions, gradient), compiled, against the layer's
    torch path bit for bit: ties (first winner), NaN (the last NaN wins), -inf and -FLT_MAX
    values against the padding, windows reaching beyond the image."""
    from segaware_caffe.layers import pooling as pooling_module
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(2, 3, 9, 10, generator=gen, dtype=dtype).round(decimals=0)   # many ties
    x[0, 0, 0, :4] = float("-inf")
    x[0, 1, :3, :3] = -pooling_module.FLT_MAX
    x[1, 0, 4, 4], x[1, 0, 4, 5], x[1, 2, 8, 9] = float("nan"), float("nan"), float("inf")
    out_hw = tuple(pooling_module.pooled_size(size, k, p, s, round_mode)
                   for size, k, p, s in zip(x.shape[2:], kernel, pad, stride))
    assert pooling_module._CompiledMaxPool.applies(x)

    def pooled(compiled):
        with monkeypatch.context() as patch:
            if not compiled:
                patch.setattr(pooling_module._CompiledMaxPool, "applies", lambda x: False)
            leaf = x.clone().requires_grad_(True)
            top, mask = pooling_module.pool2d(leaf, "MAX", kernel, pad, stride, out_hw, True)
            grad = torch.randn(top.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
            (grad_x,) = torch.autograd.grad(top, leaf, grad)
            return top, mask, grad_x

    for got, expected in zip(pooled(True), pooled(False)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_l1", [True, False])
@pytest.mark.parametrize("geometry_case", GEOMETRIES + [
    ((1, 2, 9, 11), 0, (5, 3), (0, 3), (3, 2), (1, 2), 1),       # centres outside, no pad rows
    ((2, 3, 10, 10), 0, (3, 3), (2, 2), (1, 1), (2, 2), 1)])     # the released 'same' geometry
def test_compiled_distance_backward_equals_the_torch_loop(geometry_case, norm_l1, dtype,
                                                          monkeypatch):
    """Im2dist's backward, compiled, against the torch loop: bit for bit (the same operations in
    the same order on every element), with ties (sign 0), NaN and infinite inputs and gradients,
    and taps and centres outside the image."""
    im2dist_module = importlib.import_module("segaware_caffe.kernels.im2dist")
    shape, _, kernel, pad, stride, dilation, _ = geometry_case
    geometry = ConvGeometry(kernel, pad, stride, dilation)
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(shape, generator=gen, dtype=dtype).round(decimals=1)   # equal neighbours
    x[0, 0, 1, 2], x[-1, -1, -1, 0] = float("inf"), float("nan")
    out_h, out_w = geometry.output_size(*shape[2:])
    grad_out = torch.randn(shape[0], geometry.taps, out_h, out_w, generator=gen, dtype=dtype)
    grad_out[0, 0, 0, 0], grad_out[-1, -1, -1, -1] = float("inf"), float("nan")
    compiled = im2dist_module._backward_native(grad_out, x, geometry, norm_l1)
    assert compiled is not None
    expected = im2dist_module._backward_torch(grad_out, x, geometry, norm_l1)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=0, equal_nan=True)
    with monkeypatch.context() as patch:      # the op's CPU path takes the compiled loop
        patch.setattr(im2dist_module, "_backward_torch", None)
        torch.testing.assert_close(im2dist_module._backward_cpu(grad_out, x, geometry, norm_l1),
                                   expected, rtol=0, atol=0, equal_nan=True)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel,pad,stride", [((3, 3), (1, 1), (1, 1)), ((2, 2), (0, 0), (2, 2)),
                                               ((3, 2), (1, 0), (2, 1)), ((5, 5), (2, 2), (3, 3))])
def test_compiled_average_pooling_is_caffes(kernel, pad, stride, dtype):
    """Caffe's AVE windows (the divisor counts padding, not what lies past it), in both
    layouts, against the layer's pool2d."""
    from segaware_caffe.inference import compiled_pool
    from segaware_caffe.layers.pooling import pool2d
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(2, 17, 11, 9, generator=gen, dtype=dtype)   # 16+: compiled in channels_last
    x[0, 1, 4, 4] = float("nan")
    out = tuple(-(-(size + 2 * p - k) // s) + 1 for size, k, p, s in
                zip((11, 9), kernel, pad, stride))
    expected = pool2d(x, "AVE", kernel, pad, stride, out)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14
    for image in (x, x.contiguous(memory_format=torch.channels_last)):
        got = compiled_pool("avg_pool", image, kernel, pad, stride, out, fallback=None)
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance, equal_nan=True)


def test_fake_tensors_never_reach_the_compiled_loops():
    """Shape inference and torch.compile's tracing run layers on fake tensors, whose data
    pointers are no memory: those take the torch code (a compiled loop would crash the process)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from segaware_caffe.inference import compiled_pool, compiled_resize, standard_layout
    net = sc_net('layer { name: "up" type: "Interp" bottom: "data" top: "up" '
                 'interp_param { zoom_factor: 2 } }')
    with FakeTensorMode():
        x = torch.empty(1, 3, 40, 40)
        assert not native.plain(x)
        assert net.layers["up"](x).shape == (1, 3, 79, 79)
        assert compiled_resize(net.layers["up"], x).shape == (1, 3, 79, 79)
        assert compiled_pool("max_pool", x, (3, 3), (1, 1), (2, 2), (20, 20),
                             lambda t: torch.empty(1, 3, 20, 20)).shape == (1, 3, 20, 20)
        assert standard_layout(x.contiguous(memory_format=torch.channels_last)).is_contiguous()
    assert native.plain(torch.zeros(1), torch.nn.Parameter(torch.zeros(1)))


def sc_net(body):
    import segaware_caffe as sc
    return sc.Net('name: "t" input: "data" input_shape { dim: 1 dim: 3 dim: 40 dim: 40 }\n' + body)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
def test_pixel_major_input_gradients_are_the_row_major_ones(geometry_case, dtype):
    """From the same column gradients (pixel-major = row-major permuted): grad_x bit for bit
    (the same operations in the same order, into a channels_last grad_x), grad_mask within
    rounding (channels summed in 16 partial sums), NaN where an outside tap's gradient is not
    finite; for bands inside the image too."""
    shape, _, kernel, pad, stride, dilation, _ = geometry_case
    geometry = ConvGeometry(kernel, pad, stride, dilation)
    gen = torch.Generator().manual_seed(9)
    batch, channels, height, width = shape
    out_h, out_w = geometry.output_size(height, width)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    mask = torch.rand(batch, geometry.taps, out_h, out_w, generator=gen, dtype=dtype)
    x_rows = x.contiguous(memory_format=torch.channels_last)
    sizes = (channels, height, width, out_h, out_w, *kernel, *pad, *stride, *dilation)
    loops = {name: native.function("masked_conv.c", name, dtype) for name in (
        "masked_columns_grad_x", "masked_columns_grad_mask", "masked_pixel_columns_grad_x",
        "masked_pixel_columns_grad_mask")}
    for start, end in ((0, out_h), (out_h // 2, out_h)):
        rows = end - start
        grad_columns = torch.randn(batch, channels, geometry.taps, rows, out_w, generator=gen,
                                   dtype=dtype)
        grad_columns[0, 0, 0, 0, 0] = float("inf")
        pixel_major = grad_columns.permute(0, 3, 4, 2, 1).contiguous()
        grad_x = torch.randn(shape, generator=gen, dtype=dtype)   # accumulated into
        grad_x_rows = grad_x.contiguous(memory_format=torch.channels_last)
        grad_mask = torch.full_like(mask, 5.0)
        grad_mask_rows = torch.full_like(mask, 5.0)
        loops["masked_columns_grad_x"](1, batch * channels, grad_columns.data_ptr(),
                                       mask.data_ptr(), grad_x.data_ptr(), *sizes, start, end)
        loops["masked_columns_grad_mask"](1, batch * geometry.taps, grad_columns.data_ptr(),
                                          x.data_ptr(), grad_mask.data_ptr(), *sizes, start, end)
        with torch_threads(2):
            loops["masked_pixel_columns_grad_x"](2, batch, pixel_major.data_ptr(),
                                                 mask.data_ptr(), grad_x_rows.data_ptr(),
                                                 *sizes, start, end)
            loops["masked_pixel_columns_grad_mask"](2, batch, pixel_major.data_ptr(),
                                                    x_rows.data_ptr(), grad_mask_rows.data_ptr(),
                                                    *sizes, start, end)
        torch.testing.assert_close(grad_x_rows, grad_x, rtol=0, atol=0, equal_nan=True)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(grad_mask_rows, grad_mask, rtol=tolerance, atol=tolerance,
                                   equal_nan=True)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layout_conversions_are_copies(dtype):
    x = torch.randn(3, 70, 9, 11, dtype=dtype)
    x[0, 0, 0, 0] = float("nan")
    rows = masked_conv_module.to_channels_last(x)
    assert rows.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rows, x, rtol=0, atol=0, equal_nan=True)
    back = masked_conv_module.to_standard(rows)
    assert back.is_contiguous()
    torch.testing.assert_close(back, x, rtol=0, atol=0, equal_nan=True)
