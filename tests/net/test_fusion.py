"""The fused segmentation-aware convolution inside nets gives the unfused numbers."""
import numpy as np
import pytest
import torch

from segaware_caffe import caffe_proto
import segaware_caffe as sc
from segaware_caffe.resize import resize_deploy
from tests.conftest import GOLDEN
from tests.tolerances import FUSED_GRAD_MAXREL, FUSED_OUT_MAXREL, max_relative_error

GOLDEN = GOLDEN / "layers" / "segaware_conv"


def run(net, inputs, outputs=None, fuse=True):
    """Outputs, input gradients and parameter gradients of one forward/backward, through the
    fused or the unfused graph of `net`."""
    inputs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    for p in net.learnable_params:
        p.grad = None
    out = net.graph_module(outputs, fuse=fuse)(*net.feed(inputs))
    torch.manual_seed(1)
    grads = {k: torch.randn_like(v) for k, v in out.items() if v.requires_grad}
    torch.autograd.backward([out[k] for k in grads], list(grads.values()))
    param_grads = [p.grad.clone() for p in net.learnable_params]
    return ({k: v.detach() for k, v in out.items()}, {k: v.grad for k, v in inputs.items()},
            param_grads)


def test_golden_segaware_conv_is_fused_and_equal():
    fused = sc.Net(GOLDEN / "net.prototxt", weights=GOLDEN / "weights.caffemodel")
    plain = sc.Net(GOLDEN / "net.prototxt", weights=GOLDEN / "weights.caffemodel", fuse=False)
    assert [g.anchor for g in fused.fused_groups] == ["conv1_1"]
    assert not plain.fused_groups
    data = np.load(GOLDEN / "data.npz")
    inputs = {k[3:]: torch.from_numpy(data[k].copy()) for k in data.files if k.startswith("in/")}
    out_f, in_f, par_f = run(fused, inputs)
    out_p, in_p, par_p = run(plain, inputs)
    assert max_relative_error(out_f["conv1_1"], out_p["conv1_1"]) <= FUSED_OUT_MAXREL
    for k in in_f:
        assert max_relative_error(in_f[k], in_p[k]) <= FUSED_GRAD_MAXREL, k
    for a, b in zip(par_f, par_p):
        assert max_relative_error(a, b) <= FUSED_GRAD_MAXREL
    ref = torch.from_numpy(data["out/conv1_1"])
    assert max_relative_error(out_f["conv1_1"], ref) <= FUSED_OUT_MAXREL


def test_asking_for_an_intermediate_blob_runs_that_group_unfused():
    net = sc.Net(GOLDEN / "net.prototxt", weights=GOLDEN / "weights.caffemodel")
    data = np.load(GOLDEN / "data.npz")
    inputs = {k[3:]: torch.from_numpy(data[k].copy()) for k in data.files if k.startswith("in/")}
    out = net.forward(outputs=["im2col_conv1_1_hit", "conv1_1"], **inputs)
    np.testing.assert_allclose(out["im2col_conv1_1_hit"].detach().numpy(),
                               data["out/im2col_conv1_1_hit"], rtol=1e-5, atol=1e-6)
    gm = net.graph_module(["im2col_conv1_1_hit", "conv1_1"])
    assert not any(n.target.startswith("fused.") for n in gm.graph.nodes if n.op == "call_module")
    gm = net.graph_module(["conv1_1"])
    assert any(n.target.startswith("fused.") for n in gm.graph.nodes if n.op == "call_module")


# (size, dtype, backward). In float32 the whole net's gradients cannot be compared elementwise:
# fused and unfused sum in different orders (conv outputs differ by ~4e-7 relative), and a
# max-pooling window holding a near-tie (or a ReLU input within rounding of 0) then routes the
# gradient elsewhere in one graph, which moves a whole receptive field of the input's gradient
# (measured: conv3_3's gradient 6.7e-2 max / 3e-3 L2 apart at 321x321; at 65x65, input seeds 0-5
# gave 2e-3 to 8e-3 of the largest data gradient for two of the six, with either resize code).
# So float32 checks the forward (65 and 321), and float64 (where the two orders agree to ~1e-16,
# far below any pooling gap) the backward, at 65x65: a size whose fused convolutions still run in
# several bands of output rows (checked below). The fused op's float32 backward is compared with
# the unfused recipe op by op (tests/kernels/test_masked_conv.py).
VGG_RUNS = [(65, torch.float32, False), (321, torch.float32, False), (65, torch.float64, True)]


def vgg_deploy(reference, size, dtype):
    net_param = resize_deploy(caffe_proto.read_net(reference / "segaware/config/vgg/deploy.prototxt"), size)
    net = sc.Net(net_param, dtype=dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.learnable_params:
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
    return net


@pytest.mark.slow
@pytest.mark.parametrize("size, dtype, backward", VGG_RUNS,
                         ids=[f"{s}-{str(d)[6:]}-{'fwd+bwd' if b else 'fwd'}" for s, d, b in VGG_RUNS])
def test_vgg_deploy_fused_equals_unfused(reference, size, dtype, backward, monkeypatch):
    """config/vgg/deploy.prototxt: outputs within 1e-5 relative, gradients within 1e-4."""
    from segaware_caffe.kernels import masked_conv
    from segaware_caffe.kernels.masked_conv import band_rows
    if backward and dtype == torch.float64:
        # bands of at most 2 MB: at 65x65 several fused layers then run in more than one band
        monkeypatch.setattr(masked_conv, "CPU_BAND_BYTES", 2 << 20)
    CPU_BAND_BYTES = masked_conv.CPU_BAND_BYTES
    net = vgg_deploy(reference, size, dtype)       # one net, run through both graphs
    segaware_convs = [r.name for r in net.records
                      if r.type == "Convolution" and r.module.bottom_is_im2col]
    assert sorted(g.anchor for g in net.fused_groups) == sorted(segaware_convs)
    if backward and dtype == torch.float64:    # the backward check covers banded convolutions
        itemsize = torch.tensor([], dtype=dtype).element_size()
        banded = [g.anchor for g in net.fused_groups
                  if band_rows(1, net.blob_shapes[g.x_blob][1], net.fused[g.key].kernel_size[0]
                               * net.fused[g.key].kernel_size[1], net.blob_shapes[g.x_blob][3],
                               itemsize, CPU_BAND_BYTES) < net.blob_shapes[g.conv_top][2]]
        assert len(banded) >= 2, "fused convolutions that run in several bands of output rows"
    torch.manual_seed(2)
    inputs = {k: torch.randn(s, dtype=dtype) * 50 for k, s in net.input_shapes.items()}
    if not backward:
        with torch.no_grad():
            out_f = net.graph_module(fuse=True)(*net.feed(inputs))
            out_p = net.graph_module(fuse=False)(*net.feed(inputs))
    else:
        out_f, in_f, par_f = run(net, inputs, fuse=True)
        out_p, in_p, par_p = run(net, inputs, fuse=False)
    errors = {k: max_relative_error(out_f[k], out_p[k]) for k in out_p}
    print(f"vgg deploy {size}x{size} {dtype} fused vs unfused, outputs: {errors}")
    for k in out_p:
        assert errors[k] <= FUSED_OUT_MAXREL, k
    if not backward:
        return
    input_errors = {k: max_relative_error(in_f[k], in_p[k]) for k in in_p if in_p[k] is not None}
    floor = 1e-3 * max(b.abs().max().item() for b in par_p)
    param_errors = [max_relative_error(a, b, floor) for a, b in zip(par_f, par_p)]
    print(f"  gradients: inputs {input_errors}, parameters worst {max(param_errors):.2e}")
    for k, e in input_errors.items():
        assert e <= FUSED_GRAD_MAXREL, k
    for p, e in zip(net.learnable_params, param_errors):
        assert e <= FUSED_GRAD_MAXREL, [r.name for r in net.records if p in r.module.caffe_blobs()]
