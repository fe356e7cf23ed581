"""The GPU checks of bench/gpu_check.sh: CUDA against CPU at large shapes, offsets beyond 2^31
elements on real tensors, a non-default stream behind a slow producer, CUDA-graph replay,
torch.compile, bf16 autocast, deterministic gradients. Each check prints PASS / FAIL / SKIP with
its numbers and time; the exit status is the number of failures.

With --smoke (a CPU machine) the same checks run at tiny sizes: the CUDA paths through the CPU
emulation of the kernel sources (tests/kernels/cuda_emulation.py), torch.compile and autocast on
the CPU; what needs a GPU (streams, graphs, real 2^31 buffers) is skipped, saying so.

    python bench/gpu_check.py [--smoke] [--only NAME[,NAME...]]
"""
import argparse
import importlib
import os
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from segaware_caffe.kernels import _cuda, im2dist, masked_conv2d  # noqa: E402
from segaware_caffe.kernels.geometry import ConvGeometry  # noqa: E402

mc = importlib.import_module("segaware_caffe.kernels.masked_conv")
im2dist_module = importlib.import_module("segaware_caffe.kernels.im2dist")
meanfield_module = importlib.import_module("segaware_caffe.kernels.meanfield")
norm_conv_module = importlib.import_module("segaware_caffe.kernels.norm_conv")
dist_loss_module = importlib.import_module("segaware_caffe.kernels.dist_loss")


class Skip(Exception):
    pass


try:   # what tests/kernels/cuda_emulation.py raises where no C++ compiler exists
    import pytest
    SKIPPED = pytest.skip.Exception
except ImportError:
    SKIPPED = Skip


CHECKS = []


def check(function):
    CHECKS.append(function)
    return function


def relative_error(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


class Context:
    """Sizes and the two paths being compared: on a GPU the public ops on CUDA tensors; in
    smoke mode the CUDA paths on CPU tensors, run by the emulation."""

    def __init__(self, smoke):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        if smoke:
            import pytest
            from tests.kernels.cuda_emulation import emulate_cuda
            self.patch = pytest.MonkeyPatch()
            emulate_cuda(self.patch, max_grid=4)
            self.patch.setattr(_cuda, "compute_capability", lambda index: (9, 0))
            self.patch.setattr(_cuda, "device_index", lambda tensor: 0)
            self.patch.setattr(_cuda, "multiprocessors", lambda index: 2)

    def scale(self, full, tiny):
        return tiny if self.smoke else full

    def fused(self, x, mask, weight, bias, geometry, group, grad_out, mode=None):
        """(out, grad_x, grad_mask, grad_weight) of the fused convolution's CUDA path."""
        if self.smoke:
            mode = mode or mc.igemm_mode(x.dtype, (9, 0))
            if x.dtype == torch.float64:
                out = mc._forward_bands_cuda(x, mask, weight, bias, geometry, group)
                grads = mc._backward_bands_cuda(grad_out, x, mask, weight, geometry, group,
                                                (True,) * 3)
            else:
                out = mc._forward_igemm(x, mask, weight, bias, geometry, group, mode)
                grads = mc._backward_igemm(grad_out, x, mask, weight, geometry, group,
                                           (True,) * 3, mode)
            return (out, *grads)
        tensors = [t.detach().clone().requires_grad_() for t in (x, mask, weight, bias)]
        out = masked_conv2d(tensors[0], tensors[2], tensors[3], mask=tensors[1],
                            kernel_size=geometry.kernel, pad=geometry.pad,
                            stride=geometry.stride, dilation=geometry.dilation, group=group)
        out.backward(grad_out)
        return (out.detach(), tensors[0].grad, tensors[1].grad, tensors[2].grad)


def cpu_reference(x, mask, weight, bias, geometry, group, grad_out):
    """The CPU path in float64."""
    x, mask, weight, bias, grad_out = (t.detach().double().cpu()
                                       for t in (x, mask, weight, bias, grad_out))
    out = mc._forward_cpu(x, mask, weight, bias, geometry, group)
    return (out, *mc._backward_cpu(grad_out, x, mask, weight, geometry, group, (True,) * 3))


def conv_inputs(batch, channels, outputs, size, geometry, group, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    side = torch.float64 if dtype == torch.float64 else torch.float32
    out_size = geometry.output_size(size, size)
    make = lambda *shape: torch.randn(shape, generator=generator).to(device=device)  # noqa: E731
    return (make(batch, channels, size, size).to(dtype),
            torch.rand((batch, geometry.taps, *out_size), generator=generator).to(device, side),
            (make(outputs, channels // group, *geometry.kernel) * 0.05).to(dtype),
            make(outputs).to(side), make(batch, outputs, *out_size).to(dtype))


# ------------------------------------------------------------------------------------ checks

@check
def float64_many_bands(ctx):
    """float64 on CUDA runs the band path: with ~30 bands, against the CPU path."""
    size = ctx.scale(97, 13)
    geometry = ConvGeometry.of(3, 2, 1, 2)
    inputs = conv_inputs(2, ctx.scale(64, 4), ctx.scale(64, 6), size, geometry, 1,
                         torch.float64, ctx.device)
    out_w = geometry.output_size(size, size)[1]
    rows = max(1, -(-size // 30))
    band_bytes = 2 * inputs[0].shape[1] * 9 * out_w * 8 * rows
    old = mc.CUDA_BAND_BYTES
    mc.CUDA_BAND_BYTES = band_bytes
    try:
        got = ctx.fused(*inputs[:4], geometry, 1, inputs[4])
    finally:
        mc.CUDA_BAND_BYTES = old
    expected = cpu_reference(*inputs[:4], geometry, 1, inputs[4])
    errors = [relative_error(g, e) for g, e in zip(got, expected)]
    bands = -(-geometry.output_size(size, size)[0] // rows)
    assert max(errors) <= 1e-10, errors
    return f"{bands} bands, max error {max(errors):.1e} (out, dx, dmask, dW)"


# the fused convolutions of config/vgg/deploy.prototxt at the sizes a 321 x 321 input gives
RELEASED = [("conv1_1", 3, 64, 161, ConvGeometry.of(3, 1, 1, 1)),
            ("conv1_2", 64, 64, 161, ConvGeometry.of(3, 1, 1, 1)),
            ("conv3_2", 256, 256, 41, ConvGeometry.of(3, 1, 1, 1)),
            ("conv5_2", 512, 512, 41, ConvGeometry.of(3, 2, 1, 2)),
            ("fc6", 512, 1024, 41, ConvGeometry.of(3, 12, 1, 12))]
TOLERANCE = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 3e-2}


@check
def released_geometries(ctx):
    """Every fused convolution geometry of the released vgg config, float32 (3xTF32), TF32 and
    bf16 on CUDA against the float64 CPU path (of the same, bf16-rounded where bf16 runs,
    values): output and the three gradients."""
    lines = []
    for name, channels, outputs, size, geometry in RELEASED:
        if ctx.smoke:
            channels, outputs, size = min(channels, 16), min(outputs, 4), 13
        inputs = conv_inputs(1, channels, outputs, size, geometry, 1, torch.float32, ctx.device)
        rounded = [t.to(torch.bfloat16) if i in (0, 2, 4) else t for i, t in enumerate(inputs)]
        references = {torch.float32: cpu_reference(*inputs[:4], geometry, 1, inputs[4]),
                      torch.bfloat16: cpu_reference(*rounded[:4], geometry, 1, rounded[4])}
        for precision, dtype in (("fp32", torch.float32), ("tf32", torch.float32),
                                 ("bf16", torch.bfloat16)):
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            try:
                case = inputs if dtype == torch.float32 else rounded
                got = ctx.fused(*case[:4], geometry, 1, case[4])
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
            errors = [relative_error(g, e) for g, e in zip(got, references[dtype])]
            lines.append(f"{name} {precision}: " + " ".join(f"{e:.1e}" for e in errors))
            assert max(errors) <= TOLERANCE[precision], lines[-1]
    return "max relative error (out, dx, dmask, dW):\n    " + "\n    ".join(lines)


@check
def offsets_beyond_2_31(ctx):
    """Tensors of more than 2^31 elements: the last image against the same image alone."""
    if ctx.smoke:
        return smoke_offsets(ctx)
    free = torch.cuda.mem_get_info()[0]
    if free < 48 << 30:
        raise Skip(f"needs 48 GiB free on the GPU, {free / 2 ** 30:.0f} GiB free")
    batch, channels, size = 520, 64, 257                  # 2.2e9 elements of x
    assert batch * channels * size * size > 1 << 31
    geometry = ConvGeometry.of(3, 1, 1, 1)
    results = []
    generator = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(batch, channels, size, size, device="cuda", generator=generator)
    dist = im2dist(x, 3, pad=1, norm="L1")
    alone = im2dist(x[-1:].clone(), 3, pad=1, norm="L1")
    assert torch.equal(dist[-1:], alone)
    results.append("im2dist")
    mask = torch.exp(-dist * 0.01)
    del dist, alone
    weight = torch.randn(16, channels, 3, 3, device="cuda", generator=generator) * 0.05
    bias = torch.randn(16, device="cuda", generator=generator)
    out = masked_conv2d(x, weight, bias, mask=mask, pad=1)
    assert torch.equal(out[-1:], masked_conv2d(x[-1:].clone(), weight, bias,
                                               mask=mask[-1:].clone(), pad=1))
    grad_out = torch.randn_like(out)
    grad_x, grad_mask, _ = mc._backward_cuda(grad_out, x, mask, weight, geometry, 1,
                                             (True, True, False))
    last = mc._backward_cuda(grad_out[-1:].contiguous(), x[-1:].contiguous(),
                             mask[-1:].contiguous(), weight, geometry, 1, (True, True, False))
    assert torch.equal(grad_x[-1:], last[0]) and torch.equal(grad_mask[-1:], last[1])
    results.append("masked_conv2d forward, input and mask gradients")
    del out, grad_out, grad_x, grad_mask, last
    message = meanfield_module.crf_message_op(x, mask, geometry.as_list())
    assert torch.equal(message[-1:], meanfield_module.crf_message_op(
        x[-1:].clone(), mask[-1:].clone(), geometry.as_list()))
    results.append("CRF message")
    del message
    flat = x.view(-1)
    loss_terms = dist_loss_module._terms_cuda(flat, (flat > 0).float(), 0.5, 2.0, None)
    tail = slice(flat.numel() - 1000, flat.numel())
    expected = dist_loss_module._terms_cpu(flat[tail].cpu(), (flat[tail] > 0).float().cpu(),
                                           0.5, 2.0, None)
    assert all(torch.equal(t[tail].cpu(), e) for t, e in zip(loss_terms, expected))
    results.append("DistLoss terms (flat, 64-bit index)")
    del x, mask, loss_terms, flat
    torch.cuda.empty_cache()
    return f"x of {batch * channels * size * size:,} elements: " + "; ".join(results)


def smoke_offsets(ctx):
    """Smoke: the pointer-offset emulation (kernels numbering their images beyond 2^31)."""
    geometry = ConvGeometry.of(3, 1, 1, 1)
    inputs = conv_inputs(2, 3, 4, 6, geometry, 1, torch.float64, "cpu")
    n0 = (1 << 31) // inputs[0][0].numel() + 1
    plain = mc._forward_igemm(*inputs[:4], geometry, 1, "simt")
    shifted = mc._forward_igemm(*inputs[:4], geometry, 1, "simt", images=n0)
    assert torch.equal(plain, shifted)
    emb = inputs[0]
    assert torch.equal(im2dist_module._forward_cuda(emb, geometry, True, False, False, n0),
                       im2dist_module._forward_cuda(emb, geometry, True, False, False))
    return f"images numbered from {n0:,}: the same numbers (emulated)"


@check
def stream_behind_slow_producer(ctx):
    """The kernels run on torch's current stream: on a side stream behind a slow producer
    (torch.cuda._sleep), the fused convolution and im2dist see the produced values."""
    if ctx.smoke:
        raise Skip("needs a GPU (CUDA streams)")
    geometry = ConvGeometry.of(3, 1, 1, 1)
    x, mask, weight, bias, _ = conv_inputs(2, 32, 16, 65, geometry, 1, torch.float32, "cuda")
    expected = masked_conv2d(x, weight, bias, mask=mask, pad=1)
    expected_dist = im2dist(x, 3, pad=1)
    side = torch.cuda.Stream()
    target = torch.zeros_like(x)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)                  # ~0.1 s of GPU time before the copy
        target.copy_(x)
        out = masked_conv2d(target, weight, bias, mask=mask, pad=1)
        dist = im2dist(target, 3, pad=1)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, expected) and torch.equal(dist, expected_dist)
    return "side-stream results equal the default-stream ones"


class FusedModule(torch.nn.Module):
    def __init__(self, weight, bias, mask):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(bias.clone())
        self.register_buffer("mask", mask.clone())

    def forward(self, x):
        dist = im2dist(x, 3, pad=1, norm="L1")
        mask = self.mask * torch.exp(-dist.mean(1, keepdim=True) * 0.01)
        return masked_conv2d(x, self.weight, self.bias, mask=mask, pad=1)


@check
def cuda_graph_replay(ctx):
    """make_graphed_callables on a module of im2dist + the fused convolution (forward and
    backward captured), replayed on new inputs: equal to eager."""
    if ctx.smoke:
        raise Skip("needs a GPU (CUDA graphs)")
    geometry = ConvGeometry.of(3, 1, 1, 1)
    x, mask, weight, bias, grad_out = conv_inputs(2, 32, 16, 33, geometry, 1, torch.float32,
                                                  "cuda")
    eager, graphed = FusedModule(weight, bias, mask), FusedModule(weight, bias, mask)
    graphed = torch.cuda.make_graphed_callables(graphed, (x.clone().requires_grad_(),))
    for seed in range(3):
        new_x = torch.randn(x.shape, device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(seed))
        results = []
        for module in (eager, graphed):
            inp = new_x.clone().requires_grad_()
            out = module(inp)
            out.backward(grad_out)
            results.append((out.detach(), inp.grad))
        for got, expected in zip(results[1], results[0]):
            assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    return "3 replays (forward + backward) equal eager"


@check
def torch_compile(ctx):
    """torch.compile(fullgraph=True) of a segmentation-aware sc.Net: forward and backward equal
    eager."""
    from tests.kernels.test_ops_common import SEGAWARE_NET, eager_and_compiled, net_inputs
    import segaware_caffe as sc
    from segaware_caffe import caffe_proto
    net = sc.Net(caffe_proto.read_net(SEGAWARE_NET), device=ctx.device)
    inputs = {name: value.to(ctx.device) for name, value in net_inputs().items()}
    (eager, eager_grads), (out, grads) = eager_and_compiled(net, inputs)
    error = relative_error(out, eager)
    grad_error = max(relative_error(g, e) for g, e in zip(grads, eager_grads))
    assert error <= 1e-5 and grad_error <= 1e-4, (error, grad_error)
    return f"compiled vs eager: output {error:.1e}, parameter gradients {grad_error:.1e}"


@check
def bf16_autocast(ctx):
    """torch.autocast(bfloat16): the segmentation-aware net runs (nothing refused), the fused
    convolution in bf16, within bf16 precision of float32."""
    from tests.kernels.test_ops_common import SEGAWARE_NET, net_inputs
    import segaware_caffe as sc
    from segaware_caffe import caffe_proto
    net = sc.Net(caffe_proto.read_net(SEGAWARE_NET), device=ctx.device)
    inputs = {name: value.to(ctx.device) for name, value in net_inputs().items()}
    expected = net.forward(**inputs)["nc"].detach()
    with torch.autocast(ctx.device, dtype=torch.bfloat16):
        out = net.forward(outputs=["conv", "nc"], **inputs)
        out["nc"].float().sum().backward()
    assert out["conv"].dtype == torch.bfloat16
    error = relative_error(out["nc"], expected)
    assert error < 3e-2 and all(torch.isfinite(p.grad).all() for p in net.learnable_params)
    return f"bf16 autocast vs float32: {error:.1e}"


@check
def deterministic_gradients(ctx):
    """No atomics: two backward passes give bitwise-equal gradients (every precision)."""
    geometry = ConvGeometry.of(3, 2, 1, 2)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = conv_inputs(2, ctx.scale(64, 8), ctx.scale(64, 8), ctx.scale(81, 9), geometry,
                             1, dtype, ctx.device)
        first = ctx.fused(*inputs[:4], geometry, 1, inputs[4])
        second = ctx.fused(*inputs[:4], geometry, 1, inputs[4])
        assert all(torch.equal(a, b) for a, b in zip(first, second)), dtype
    return "float32 and bf16: equal"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU machine: tiny sizes, CUDA paths through the emulation")
    parser.add_argument("--only", help="comma-separated check names")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU machine")
        return 1
    ctx = Context(args.smoke)
    if not args.smoke:
        index = torch.cuda.current_device()
        try:
            import cupy
            cupy_version = cupy.__version__
        except ImportError:
            cupy_version = "missing (pip install segaware-caffe[cuda12] or [cuda13])"
        print(f"device: {torch.cuda.get_device_name(index)}, capability "
              f"{torch.cuda.get_device_capability(index)}, torch {torch.__version__} (CUDA "
              f"{torch.version.cuda}), CuPy {cupy_version}")
    selected = args.only.split(",") if args.only else None
    failures = 0
    for function in CHECKS:
        if selected and function.__name__ not in selected:
            continue
        start = time.perf_counter()
        try:
            detail = function(ctx)
            status = "PASS"
        except Skip as reason:
            status, detail = "SKIP", str(reason)
        except SKIPPED as reason:   # the emulation without a C++ compiler
            status, detail = "SKIP", str(reason)
        except Exception:  # report and go on: one log holds every check
            status, detail = "FAIL", traceback.format_exc()
            failures += 1
        print(f"{status} {function.__name__} ({time.perf_counter() - start:.1f}s): {detail}",
              flush=True)
    print(f"{failures} check(s) failed")
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
