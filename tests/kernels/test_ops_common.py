"""What every segmentation-aware op shares: batches of 0 and 33 images (CPU, and the CUDA
kernels in the CPU emulation), offsets beyond 2^31 elements in every CUDA kernel, float16 /
bfloat16 inputs, the custom-op registrations (torch.library.opcheck), torch.compile with
fullgraph=True, autocast, and the launcher's argument checks and stream."""
import importlib
import warnings

import pytest
import torch

from segaware_caffe.kernels import _cuda, dist_loss, im2dist, im2parity, masked_conv2d
from segaware_caffe.kernels.geometry import ConvGeometry
from segaware_caffe.kernels.meanfield import MessageSpec, normconv_meanfield
from segaware_caffe.kernels.norm_conv import norm_conv
from tests.kernels.cuda_emulation import emulate_cuda

modules = {name: importlib.import_module(f"segaware_caffe.kernels.{name}")
           for name in ("im2dist", "im2parity", "dist_loss", "masked_conv", "norm_conv",
                        "meanfield")}

GEOMETRY = ConvGeometry.of((3, 2), (1, 1), (2, 1), (1, 2))
SPEC = MessageSpec(3, pad=2, dilation=2, scale=0.7)


def tensors(batch, dtype=torch.float64, seed=0, height=5, width=6):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *size: torch.randn(size, generator=generator, dtype=torch.float64).to(dtype)  # noqa: E731
    return {"x": randn(batch, 4, height, width), "emb": randn(batch, 3, height, width),
            "labels": torch.randint(0, 3, (batch, 1, height, width),
                                    generator=generator).to(dtype),
            "weight": randn(6, 2, *GEOMETRY.kernel), "bias": randn(6),
            "scale": torch.tensor([0.6], dtype=dtype), "lam": torch.tensor(0.4, dtype=dtype),
            "matrix": randn(4, 4)}


# each op as a function of the tensors above (group 2 where the op has groups)
def op_im2dist(t):
    return im2dist(t["emb"], GEOMETRY.kernel, GEOMETRY.pad, GEOMETRY.stride, GEOMETRY.dilation,
                   norm="L1", remove_center=True)


def op_im2parity(t):
    return im2parity(t["labels"], GEOMETRY.kernel, GEOMETRY.pad, GEOMETRY.stride,
                     GEOMETRY.dilation, ignore_label=2)


def op_dist_loss(t):
    dist = im2dist(t["emb"], 3, pad=1)
    return dist_loss(dist, im2parity(t["labels"], 3, pad=1), 0.5, 2.0, ignore_label=2)


def op_masked_conv(t):
    return masked_conv2d(t["x"], t["weight"], t["bias"], emb=t["emb"], lam=t["lam"],
                         kernel_size=GEOMETRY.kernel, pad=GEOMETRY.pad, stride=GEOMETRY.stride,
                         dilation=GEOMETRY.dilation, group=2)


def op_norm_conv(t):
    return norm_conv(t["x"], t["emb"], t["weight"], t["bias"], t["scale"],
                     kernel_size=GEOMETRY.kernel, pad=GEOMETRY.pad, stride=GEOMETRY.stride,
                     dilation=GEOMETRY.dilation, group=2)


def op_meanfield(t):
    return normconv_meanfield(t["x"], t["x"] * 0.5, t["emb"], t["emb"][:, :2], t["matrix"],
                              t["matrix"] * 0.3, -t["matrix"].abs(), num_iterations=2,
                              bilateral=SPEC, spatial=MessageSpec(3, pad=1, scale=0.2))


OPS = {"im2dist": op_im2dist, "im2parity": op_im2parity, "dist_loss": op_dist_loss,
       "masked_conv2d": op_masked_conv, "norm_conv": op_norm_conv, "meanfield": op_meanfield}
PER_IMAGE = ("im2dist", "im2parity", "masked_conv2d", "norm_conv", "meanfield")


def run(op, t, grad_keys=("x", "emb", "weight", "bias", "scale", "lam", "matrix"),
        seed_dtype=None):
    """op's output and the gradients of its differentiable inputs for a fixed top gradient
    (its values rounded to seed_dtype if given)."""
    t = {k: v.clone().requires_grad_(k in grad_keys) for k, v in t.items()}
    out = OPS[op](t)
    grads = {}
    if out.requires_grad:
        seed = torch.linspace(-1, 1, out.numel(), dtype=seed_dtype or out.dtype)
        seed = seed.to(out.dtype).reshape(out.shape)
        out.backward(seed)
        grads = {k: v.grad for k, v in t.items() if v.grad is not None}
    return out, grads


# ------------------------------------------------------------------------------ batch 0 and 33

@pytest.mark.parametrize("op", list(OPS))
def test_batch_of_zero(op):
    out, grads = run(op, tensors(0))
    if op == "dist_loss":
        assert out.shape == () and torch.isnan(out)      # 0 / 0, as the original's arithmetic
    else:
        assert out.shape[0] == 0
    for key, grad in grads.items():
        assert torch.count_nonzero(grad) == 0, key


@pytest.mark.parametrize("op", PER_IMAGE)
def test_batch_of_33_is_33_single_images(op):
    batch = tensors(33, seed=1)
    out, _ = run(op, batch)
    assert out.shape[0] == 33
    for n in (0, 17, 32):
        single = {k: (v[n:n + 1] if k in ("x", "emb", "labels") else v) for k, v in batch.items()}
        torch.testing.assert_close(out[n:n + 1], run(op, single)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("batch", [0, 33])
@pytest.mark.parametrize("op", list(OPS))
def test_cuda_batch_of_0_and_33(op, batch):
    """The public ops on CUDA tensors against the CPU, batches of 0 and 33 images."""
    cpu = tensors(batch, seed=7)
    cuda = {k: v.cuda() for k, v in cpu.items()}
    expected, expected_grads = run(op, cpu)
    got, grads = run(op, cuda)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-9, equal_nan=True)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key].cpu(), grad, rtol=1e-9, atol=1e-9, msg=key)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", list(OPS))
def test_cuda_half_inputs(op, dtype):
    """Half inputs on CUDA (the fused convolution in half mma, the rest in float32) against the
    CPU's float32 computation of the same half values."""
    half = tensors(2, dtype=dtype, seed=8)
    got, grads = run(op, {k: v.cuda() for k, v in half.items()})
    expected, expected_grads = run(op, {k: v.float() for k, v in half.items()},
                                   seed_dtype=dtype)
    assert got.dtype == dtype
    limit = 16 * torch.finfo(dtype).eps
    assert ((got.float().cpu() - expected).abs().max() / expected.abs().max()).item() <= limit
    for key, grad in grads.items():
        reference = expected_grads[key]
        error = ((grad.float().cpu() - reference).abs().max() / reference.abs().max()).item()
        assert error <= limit, (key, error)


def test_dist_loss_batch_of_33():
    out, grads = run("dist_loss", tensors(33, seed=2))
    assert out.shape == () and torch.isfinite(out) and grads["emb"].shape[0] == 33


def emulated_paths(monkeypatch):
    emulate_cuda(monkeypatch, max_grid=3)
    monkeypatch.setattr(_cuda, "compute_capability", lambda index: (9, 0))
    monkeypatch.setattr(_cuda, "device_index", lambda tensor: 0)
    monkeypatch.setattr(_cuda, "multiprocessors", lambda index: 2)


def cuda_and_cpu_paths(t):
    """(name, CUDA path result, CPU path result) for every kernel of every op."""
    m = modules
    x, emb, labels, weight, bias = (t[k] for k in ("x", "emb", "labels", "weight", "bias"))
    out_size = GEOMETRY.output_size(*x.shape[2:])
    generator = torch.Generator().manual_seed(3)
    attention = torch.rand((x.shape[0], GEOMETRY.taps, *out_size), generator=generator,
                           dtype=x.dtype)
    grad_conv = torch.randn((x.shape[0], 6, *out_size), generator=generator, dtype=x.dtype)
    grad_taps = torch.randn((x.shape[0], GEOMETRY.taps, *out_size), generator=generator,
                            dtype=x.dtype)
    grad_message = torch.randn((x.shape[0], 4, *out_size), generator=generator, dtype=x.dtype)
    everything = (True, True, True)
    yield ("im2dist forward", m["im2dist"]._forward_cuda(emb, GEOMETRY, True, True, True),
           m["im2dist"]._forward_cpu(emb, GEOMETRY, True, True, True))
    yield ("im2dist backward", m["im2dist"]._backward_cuda(grad_taps, emb, GEOMETRY, False),
           m["im2dist"]._backward_cpu(grad_taps, emb, GEOMETRY, False))
    yield ("im2parity", m["im2parity"]._forward_cuda(labels, GEOMETRY, 2),
           m["im2parity"]._forward_cpu(labels, GEOMETRY, 2))
    yield ("dist_loss", m["dist_loss"]._terms_cuda(grad_taps, attention.round(), 0.5, 2.0, 1),
           m["dist_loss"]._terms_cpu(grad_taps, attention.round(), 0.5, 2.0, 1))
    for impl in ("bands", "igemm"):
        m["masked_conv"].CUDA_IMPL = impl
        try:
            yield (f"masked_conv {impl} forward",
                   m["masked_conv"]._forward_cuda(x, attention, weight, bias, GEOMETRY, 2),
                   m["masked_conv"]._forward_cpu(x, attention, weight, bias, GEOMETRY, 2))
            yield (f"masked_conv {impl} backward",
                   m["masked_conv"]._backward_cuda(grad_conv, x, attention, weight, GEOMETRY, 2,
                                                   everything),
                   m["masked_conv"]._backward_cpu(grad_conv, x, attention, weight, GEOMETRY, 2,
                                                  everything))
        finally:
            m["masked_conv"].CUDA_IMPL = "auto"
    yield ("norm_conv forward",
           m["norm_conv"]._forward_cuda(x, attention, weight, bias, GEOMETRY, 2),
           m["norm_conv"]._forward_cpu(x, attention, weight, bias, GEOMETRY, 2))
    yield ("norm_conv backward",
           m["norm_conv"]._backward_cuda(grad_conv, x, attention, weight, GEOMETRY, 2, everything),
           m["norm_conv"]._backward_cpu(grad_conv, x, attention, weight, GEOMETRY, 2, everything))
    yield ("crf message forward", m["meanfield"]._message_forward_cuda(x, attention, GEOMETRY),
           m["meanfield"]._message_forward_cpu(x, attention, GEOMETRY))
    yield ("crf message backward",
           m["meanfield"]._message_backward_cuda(grad_message, x, attention, GEOMETRY,
                                                 (True, True)),
           m["meanfield"]._message_backward_cpu(grad_message, x, attention, GEOMETRY,
                                                (True, True)))


@pytest.mark.parametrize("batch", [0, 33])
def test_cuda_kernels_batch_of_0_and_33(monkeypatch, batch):
    """Every CUDA kernel (emulated, grid capped at 3 blocks per dimension) against the CPU path
    on batches of 0 and 33 images (33 rows of taps and channels: more rows than blocks)."""
    emulated_paths(monkeypatch)
    for name, got, expected in cuda_and_cpu_paths(tensors(batch, height=4, width=5)):
        got = got if isinstance(got, tuple) else (got,)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for g, e in zip(got, expected):
            assert g.shape == e.shape, name
            torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-11, msg=name)


def test_cuda_kernels_offsets_beyond_2_31(monkeypatch):
    """Every row-plane and flat kernel launched as if its images were number n0.. of a huge
    batch (pointers moved back by n0 images, so every per-image offset exceeds 2^31 elements):
    the same numbers as the plain launch. The implicit GEMM and band kernels have their own
    test in test_masked_conv_cuda.py."""
    emulated_paths(monkeypatch)
    m = modules
    t = tensors(2, height=4, width=5)
    x, emb, labels, weight, bias = (t[k] for k in ("x", "emb", "labels", "weight", "bias"))
    out_size = GEOMETRY.output_size(4, 5)
    attention = torch.rand(2, GEOMETRY.taps, *out_size, dtype=torch.float64)
    grad_conv = torch.randn(2, 6, *out_size, dtype=torch.float64)
    grad_message = torch.randn(2, 4, *out_size, dtype=torch.float64)
    n0 = (1 << 31) // min(emb[0].numel(), attention[0].numel()) + 1
    checks = [
        lambda images: m["im2dist"]._forward_cuda(emb, GEOMETRY, False, True, True, images),
        lambda images: m["im2dist"]._backward_cuda(attention, emb, GEOMETRY, True, images),
        lambda images: m["im2parity"]._forward_cuda(labels, GEOMETRY, None, images),
        lambda images: m["norm_conv"]._forward_cuda(x, attention, weight, bias, GEOMETRY, 2,
                                                    images),
        lambda images: m["norm_conv"]._backward_cuda(grad_conv, x, attention, weight, GEOMETRY,
                                                     2, (True, True, False), images),
        lambda images: m["meanfield"]._message_forward_cuda(x, attention, GEOMETRY, images),
        lambda images: m["meanfield"]._message_backward_cuda(grad_message, x, attention,
                                                             GEOMETRY, (True, True), images),
    ]
    for check in checks:
        results = [[r for r in (check(i) if isinstance(check(i), tuple) else (check(i),))
                    if r is not None] for i in (n0, 0)]
        for got, expected in zip(*results):
            assert torch.equal(got, expected)
    flat = attention.reshape(-1)
    begin = (1 << 31) + 12345
    for got, expected in zip(m["dist_loss"]._terms_cuda(flat, flat.round(), 0.5, 2.0, None, begin),
                             m["dist_loss"]._terms_cuda(flat, flat.round(), 0.5, 2.0, None)):
        assert torch.equal(got, expected)


def test_launch_rejects_rows_beyond_32_bits(monkeypatch):
    emulated_paths(monkeypatch)
    emb = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(OverflowError, match="im2dist_forward: the row count"):
        modules["im2dist"]._forward_cuda(emb, ConvGeometry.of(3, 1), False, False, False,
                                         images=(1 << 31) // 9 + 1)


# ------------------------------------------------------------------------- float16 / bfloat16

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", list(OPS))
def test_half_inputs_run_in_float32_and_come_back(op, dtype):
    half = tensors(2, dtype=dtype, seed=4)
    out, grads = run(op, half)
    assert out.dtype == dtype
    widened = {k: v.float() for k, v in half.items()}
    expected, expected_grads = run(op, widened, seed_dtype=dtype)
    if op in ("dist_loss", "meanfield"):
        # chains of ops whose intermediate results are half in one run and float32 in the other
        error = ((out.float() - expected).abs().max() / expected.abs().max()).item()
        assert error <= 8 * torch.finfo(dtype).eps
    else:
        # one op: the float32 computation of the same (half) values, rounded once
        torch.testing.assert_close(out.float(), expected.to(dtype).float(), rtol=0, atol=0)
    for key, grad in grads.items():
        assert grad.dtype == dtype, key
        reference = expected_grads[key]
        error = ((grad.float() - reference).abs().max() / reference.abs().max()).item()
        assert error <= 8 * torch.finfo(dtype).eps, (key, error)


# ------------------------------------------------------------------------- custom-op checks

def opcheck_cases():
    t = tensors(2)
    x, emb, labels, weight, bias = (t[k] for k in ("x", "emb", "labels", "weight", "bias"))
    geometry = GEOMETRY.as_list()
    out_size = GEOMETRY.output_size(*x.shape[2:])
    attention = torch.rand(2, GEOMETRY.taps, *out_size, dtype=torch.float64)
    grad = torch.randn(2, 6, *out_size, dtype=torch.float64)
    ops = torch.ops.segaware
    g = lambda v: v.clone().requires_grad_()  # noqa: E731
    return {
        "im2dist": (ops.im2dist, (g(emb), geometry, True, False, True)),
        "im2parity": (ops.im2parity, (labels, geometry, 2)),
        "dist_loss": (ops.dist_loss, (g(attention), attention.round(), 0.5, 2.0, 1)),
        "masked_conv2d": (ops.masked_conv2d, (g(x), g(attention), g(weight), g(bias), geometry,
                                              2)),
        "attention_conv": (ops.attention_conv, (g(x), g(attention), g(weight), None, geometry,
                                                2)),
        "crf_message": (ops.crf_message, (g(x), g(attention), geometry)),
        # the backward ops (no autograd of their own: the forward ops' backward calls them)
        "im2dist_backward": (ops.im2dist_backward, (attention, emb, geometry, False)),
        "masked_conv2d_backward": (ops.masked_conv2d_backward,
                                   (grad, x, attention, weight, geometry, 2,
                                    [True, False, True, True])),
        "attention_conv_backward": (ops.attention_conv_backward,
                                    (grad, x, attention, weight, geometry, 2,
                                     [False, True, True, False])),
        "crf_message_backward": (ops.crf_message_backward,
                                 (torch.randn_like(x[:, :, :out_size[0], :out_size[1]]), x,
                                  attention, geometry, [True, True])),
    }


@pytest.mark.parametrize("name", ["im2dist", "im2parity", "dist_loss", "masked_conv2d",
                                  "attention_conv", "crf_message", "im2dist_backward",
                                  "masked_conv2d_backward", "attention_conv_backward",
                                  "crf_message_backward"])
def test_opcheck(name):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of each op."""
    op, args = opcheck_cases()[name]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("op", list(OPS))
def test_compile_fullgraph(op):
    """fullgraph=True: no graph break in the op, its fake implementation or its backward (the
    AOT-autograd backend traces both passes); same numbers as eager."""
    t = tensors(2, seed=5)
    compiled = torch.compile(OPS[op], fullgraph=True, backend="aot_eager", dynamic=False)
    expected = run(op, t)
    t2 = {k: v.clone().requires_grad_(k not in ("labels",)) for k, v in t.items()}
    out = compiled(t2)
    torch.testing.assert_close(out, expected[0], rtol=1e-12, atol=1e-12)
    if out.requires_grad:
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        for key, grad in expected[1].items():
            torch.testing.assert_close(t2[key].grad, grad, rtol=1e-12, atol=1e-12, msg=key)


SEGAWARE_NET = """
name: "tiny_segaware"
force_backward: true
input: "x" input_shape { dim: 2 dim: 3 dim: 9 dim: 10 }
input: "emb" input_shape { dim: 2 dim: 4 dim: 9 dim: 10 }
layer { name: "dist" type: "Im2dist" bottom: "emb" top: "dist"
  convolution_param { kernel_size: 3 pad: 2 dilation: 2 } im2dist_param { norm: L1 } }
layer { name: "scaled" type: "Scale" bottom: "dist" top: "scaled"
  scale_param { num_axes: 0 filler { type: "constant" value: 0.2 } bias_term: false } }
layer { name: "abs" type: "AbsVal" bottom: "scaled" top: "abs" }
layer { name: "mask" type: "Exp" bottom: "abs" top: "mask" exp_param { scale: -1 } }
layer { name: "mask3" type: "Tile" bottom: "mask" top: "mask3" tile_param { axis: 1 tiles: 3 } }
layer { name: "cols" type: "Im2col" bottom: "x" top: "cols"
  convolution_param { kernel_size: 3 pad: 2 dilation: 2 } }
layer { name: "hit" type: "Eltwise" bottom: "cols" bottom: "mask3" top: "hit"
  eltwise_param { operation: PROD } }
layer { name: "conv" type: "Convolution" bottom: "hit" top: "conv"
  convolution_param { num_output: 5 kernel_size: 3 pad: 2 dilation: 2 bottom_is_im2col: true
                      weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "nc" type: "NormConv" bottom: "conv" bottom: "emb" top: "nc"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } }
  norm_conv_param { scale_filler { type: "constant" value: 0.5 } } }
"""


def tiny_net(tmp_path, **kwargs):
    import segaware_caffe as sc
    path = tmp_path / "net.prototxt"
    path.write_text(SEGAWARE_NET)
    torch.manual_seed(0)
    return sc.Net(path, **kwargs)


def net_inputs():
    generator = torch.Generator().manual_seed(6)
    return {"x": torch.randn(2, 3, 9, 10, generator=generator),
            "emb": torch.randn(2, 4, 9, 10, generator=generator)}



def eager_and_compiled(net, inputs):
    """Top "nc" of `net` and the gradients of its sum for the learnable parameters, run eagerly
    and through torch.compile(fullgraph=True): ((top, gradients), (top, gradients))."""
    eager = net.forward(**inputs)["nc"]
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in net.learnable_params]
    net.zero_grad()
    out = torch.compile(net, fullgraph=True)(**inputs)["nc"]
    out.sum().backward()
    return (eager, eager_grads), (out, [p.grad for p in net.learnable_params])

def test_compile_segaware_net_fullgraph(tmp_path):
    """A segmentation-aware net through sc.Net (fused masked convolution, Im2dist, NormConv)
    compiled with torch.compile(fullgraph=True) and the default (inductor) backend on the
    CPU: forward and backward equal eager."""
    net = tiny_net(tmp_path)
    assert [g.anchor for g in net.fused_groups] == ["conv"]
    (eager, eager_grads), (out, grads) = eager_and_compiled(net, net_inputs())
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_autocast_bfloat16_net(tmp_path):
    """torch.autocast on the CPU with bfloat16: the segmentation-aware layers run (nothing is
    refused) and stay within bfloat16 precision of float32."""
    net = tiny_net(tmp_path)
    inputs = net_inputs()
    expected = net.forward(**inputs)["nc"].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.forward(**inputs)["nc"]
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    error = ((out.float() - expected).abs().max() / expected.abs().max()).item()
    assert error < 3e-2, error
    assert all(torch.isfinite(p.grad).all() for p in net.learnable_params)


def test_autocast_masked_conv_casts_like_a_convolution():
    t = tensors(2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_conv2d(t["x"], t["weight"], t["bias"], emb=t["emb"], lam=t["lam"],
                            kernel_size=GEOMETRY.kernel, pad=GEOMETRY.pad, stride=GEOMETRY.stride,
                            dilation=GEOMETRY.dilation, group=2)
    assert out.dtype == torch.bfloat16
    expected = op_masked_conv({k: v.to(torch.bfloat16) if k in ("x", "weight") else v
                               for k, v in t.items()})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------ the launcher

def test_launch_checks_dtypes_devices_contiguity_and_ints():
    like = torch.zeros(4)
    code = "unused"
    cases = [((torch.zeros(4, dtype=torch.float64),), ValueError,
              r"k: tensor argument 0 is of dtype torch.float64 \(expected torch.float32\)"),
             ((torch.zeros(4, 4).t(),), ValueError, "tensor argument 0 is not contiguous"),
             ((torch.zeros(4, device="meta"),), ValueError, "tensor argument 0 is on meta"),
             ((1 << 31,), OverflowError, "int argument 0 = 2147483648 does not fit"),
             (("text",), TypeError, "unsupported kernel argument 0 of type str")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            _cuda.launch("k", code, grid=(1, 1, 1), block=(1, 1, 1), args=args, like=like)
    converted = _cuda.convert_args("k", (_cuda.Typed(torch.zeros(2, dtype=torch.int32),
                                                     torch.int32), 3, 2.5, _cuda.Int64(1 << 40)),
                                   like)
    assert [kind for kind, _ in converted] == ["ptr", "i32", "f32", "i64"]


class FakeStream:
    def __init__(self, handle):
        self.cuda_stream = handle


class FakeCupy:
    """Just enough of CuPy's stream API for _cuda.cupy_stream."""

    def __init__(self, version):
        self.made = []
        outer = self

        class Stream:
            if version >= 14:
                @staticmethod
                def from_external(obj):
                    outer.made.append(("from_external", obj.__cuda_stream__()))
                    return ("stream", obj.__cuda_stream__()[1])

        class Device:
            def __init__(self, index):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        def external_stream(handle, device):
            warnings.warn("ExternalStream is deprecated", DeprecationWarning)
            outer.made.append(("ExternalStream", handle, device))
            return ("stream", handle)

        self.cuda = type("cuda", (), {"Stream": Stream, "Device": Device,
                                      "ExternalStream": staticmethod(external_stream)})


@pytest.mark.parametrize("version", [13, 14])
def test_stream_follows_torch_and_uses_the_cupy_14_protocol(monkeypatch, version):
    cupy = FakeCupy(version)
    handles = iter([111, 111, 222])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: FakeStream(next(handles)))
    monkeypatch.setattr(_cuda, "_STREAMS", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error" if version >= 14 else "ignore")
        streams = [_cuda.cupy_stream(cupy, 0) for _ in range(3)]
    assert streams == [("stream", 111), ("stream", 111), ("stream", 222)]
    # one wrapper per raw stream, made the CuPy-14 way where it exists
    kind = "from_external" if version >= 14 else "ExternalStream"
    assert [made[0] for made in cupy.made] == [kind, kind]
