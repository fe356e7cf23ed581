"""The graph forward() runs with autograd on (segaware_caffe/split_products.py): a 1x1
convolution of a Concat of Interp resizes computed part by part gives the exact graph's top and
gradients (parameters and inputs), and the rewrite stays away where a blob it would remove is
asked for or where it saves nothing."""
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.split_products import SplitPointwiseProduct


def head_net(outputs=64, bias=True, pad_beg=0, shrink=False):
    """The released embedding head: an RGB part, a part at full size, two resized parts."""
    resize = "shrink_factor: 2" if shrink else "height: 13 width: 13"
    b_size = 25 if shrink else 7         # 25 shrinks to 13
    return f'''
name: "head"
input: "rgb" input_shape {{ dim: 2 dim: 3 dim: 13 dim: 13 }}
input: "a" input_shape {{ dim: 2 dim: 5 dim: 13 dim: 13 }}
input: "b" input_shape {{ dim: 2 dim: 70 dim: {b_size} dim: {b_size} }}
input: "c" input_shape {{ dim: 2 dim: 90 dim: 4 dim: 4 }}
layer {{ name: "b_resized" type: "Interp" bottom: "b" top: "b_resized"
        interp_param {{ {resize} pad_beg: {pad_beg} }} }}
layer {{ name: "c_resized" type: "Interp" bottom: "c" top: "c_resized"
        interp_param {{ height: 13 width: 13 }} }}
layer {{ name: "fused" type: "Concat" bottom: "rgb" bottom: "a" bottom: "b_resized"
        bottom: "c_resized" top: "fused" }}
layer {{ name: "emb" type: "Convolution" bottom: "fused" top: "emb"
        convolution_param {{ num_output: {outputs} kernel_size: 1 bias_term: {str(bias).lower()}
        weight_filler {{ type: "gaussian" std: 0.1 }} bias_filler {{ type: "gaussian" }} }} }}
'''


def split_modules(net, outputs=None):
    graph = net.autograd_graph_module(outputs)
    return [m for m in graph.modules() if isinstance(m, SplitPointwiseProduct)]


def compare(net, dtype, outputs=None):
    torch.manual_seed(0)
    net = net.to(dtype)
    inputs = {k: torch.randn(s, dtype=dtype, requires_grad=True)
              for k, s in net.input_shapes.items()}
    leaves = list(inputs.values()) + list(net.learnable_params)
    results = []
    for graph in (net.autograd_graph_module(outputs), net.graph_module(outputs)):
        out = graph(*net.feed(inputs))
        probe = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
                 for k, v in out.items()}
        total = sum((v * probe[k]).sum() for k, v in out.items())
        results.append((out, torch.autograd.grad(total, leaves)))
    (split_out, split_grads), (exact_out, exact_grads) = results
    # float32: sums of a few thousand products in another order
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    for name in exact_out:
        torch.testing.assert_close(split_out[name], exact_out[name], rtol=tolerance,
                                   atol=tolerance)
    for got, expected in zip(split_grads, exact_grads):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pad_beg, shrink", [(0, False), (-1, False), (0, True)])
def test_split_product_is_the_exact_graph(dtype, bias, pad_beg, shrink):
    net = sc.Net(head_net(bias=bias, pad_beg=pad_beg, shrink=shrink), phase="train")
    (module,) = split_modules(net)
    assert module.parts == (3, 5, 70, 90)
    compare(net, dtype)


def test_every_part_resized():
    text = head_net().replace('bottom: "rgb" bottom: "a" ', "").replace(
        'input: "rgb" input_shape { dim: 2 dim: 3 dim: 13 dim: 13 }\n', "").replace(
        'input: "a" input_shape { dim: 2 dim: 5 dim: 13 dim: 13 }\n', "")
    net = sc.Net(text, phase="train")
    (module,) = split_modules(net)
    assert module.resizes[0] is not None and module.resizes[1] is not None
    compare(net, torch.float64)


def test_a_requested_blob_keeps_its_layer():
    net = sc.Net(head_net(), phase="train")
    assert split_modules(net, ["emb", "fused"]) == []
    (module,) = split_modules(net, ["emb", "b_resized"])   # b_resized stays a part as it is
    assert [r is not None for r in module.resizes] == [False, False, False, True]
    assert len(split_modules(net, ["emb"])) == 1
    compare(net, torch.float64, ["emb", "fused"])
    compare(net, torch.float64, ["emb", "b_resized"])


def test_no_split_where_it_saves_nothing():
    """Every resized part has fewer channels than the convolution has outputs."""
    net = sc.Net(head_net(outputs=100), phase="train")
    assert split_modules(net) == []
    assert net.autograd_graph_module() is net.graph_module()


def test_forward_runs_it_with_autograd_on():
    net = sc.Net(head_net(), phase="train")
    calls = []
    handle = split_modules(net)[0].register_forward_hook(lambda *args: calls.append(1))
    inputs = {k: torch.randn(s) for k, s in net.input_shapes.items()}
    net.forward(**inputs)["emb"].sum().backward()
    handle.remove()
    assert calls == [1]
