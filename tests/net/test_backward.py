"""Caffe's backward analysis (segaware_caffe.backward) and what the graph makes of it: which
bottoms get a diff, propagate_down, force_backward with AllowForceBackward, layers that ignore
propagate_down, and refused gradients."""
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.backward import DETACH, KEEP, REFUSE
from segaware_caffe.errors import NoBackwardError
from tests.net import toy_net  # noqa: F401  (registers TestTakeFirst, TestNoBackward)


def flags_of(net, name):
    index = next(i for i, r in enumerate(net.records) if r.name == name)
    return net.backward_plan.edges[index]


CHAIN = """
name: "t"
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y" PROPAGATE
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "Power" bottom: "y" top: "loss" loss_weight: 1 }
"""


def test_propagate_down_false_skips_the_producer_but_not_the_layers_own_params():
    net = sc.Net(CHAIN.replace("PROPAGATE", "propagate_down: false"), phase="train")
    assert flags_of(net, "ip2") == [DETACH]
    flags = net.backward_flags
    names = [r.name for r in net.records]
    # ip1's only top is read without a diff: Caffe skips ip1's backward altogether
    assert not flags.layer_need[names.index("ip1")]
    assert flags.layer_need[names.index("ip2")]
    net.loss(net.forward(x=torch.randn(2, 3))).backward()
    assert net.params["ip1"][0].grad is None
    assert net.params["ip2"][0].grad is not None


def test_a_layer_that_ignores_propagate_down_still_feeds_a_producer_that_runs_backward():
    # Im2dist writes its bottom diff whatever propagate_down says; its producer reads it when
    # the producer runs backward for another reason (here: a second reader through a Split)
    text = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
    layer { name: "conv" type: "Convolution" bottom: "x" top: "e"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
    layer { name: "dist" type: "Im2dist" bottom: "e" top: "d" PROPAGATE
            convolution_param { kernel_size: 3 pad: 1 } im2dist_param { norm: L2 } }
    layer { name: "l1" type: "Power" bottom: "d" top: "l1" loss_weight: 1 }
    layer { name: "l2" type: "Power" bottom: "e" top: "l2" loss_weight: 1 }
    """
    x = torch.randn(1, 2, 4, 4)
    grads = []
    for propagate in ("propagate_down: false", ""):
        torch.manual_seed(0)
        net = sc.Net(text.replace("PROPAGATE", propagate), phase="train")
        net.loss(net.forward(x=x)).backward()
        grads.append(net.params["conv"][0].grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    # without the second reader, conv's only top is skipped: Caffe runs no backward for conv,
    # although Im2dist writes that top's diff
    alone = sc.Net(text.replace("PROPAGATE", "propagate_down: false").replace(
        'layer { name: "l2" type: "Power" bottom: "e" top: "l2" loss_weight: 1 }', ""), phase="train")
    assert flags_of(alone, "dist") == [DETACH]
    assert not alone.loss(alone.forward(x=x)).requires_grad     # nothing to backpropagate


def test_force_backward_reaches_every_bottom_but_a_loss_label():
    text = """
    name: "t"
    force_backward: true
    input: "s" input_shape { dim: 2 dim: 3 }
    input: "label" input_shape { dim: 2 }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "label" top: "loss" }
    """
    net = sc.Net(text, phase="train")
    assert flags_of(net, "loss") == [KEEP, DETACH]
    s = torch.randn(2, 3, requires_grad=True)
    label = torch.tensor([0.0, 2.0], requires_grad=True)
    net.loss(net.forward(s=s, label=label)).backward()
    assert s.grad is not None and label.grad is None


def test_a_refused_bottom_that_would_get_a_diff_raises_naming_the_layer():
    text = """
    name: "t"
    input: "a" input_shape { dim: 2 }
    input: "i" input_shape { dim: 2 }
    layer { name: "w" type: "Scale" bottom: "i" top: "iw" scale_param { axis: 0 num_axes: 0 } }
    layer { name: "take" type: "TestTakeFirst" bottom: "a" bottom: "iw" top: "y" PROPAGATE }
    layer { name: "loss" type: "Power" bottom: "y" top: "loss" loss_weight: 1 }
    """
    net = sc.Net(text.replace("PROPAGATE", ""), phase="train")
    assert flags_of(net, "take") == [KEEP, REFUSE]
    a = torch.ones(2, requires_grad=True)
    out = net.forward(a=a, i=torch.ones(2))
    with pytest.raises(NoBackwardError, match=r"take \(TestTakeFirst\) cannot backpropagate into "
                                              r"bottom 1 \('iw'\) in the original Caffe"):
        net.loss(out).backward()
    # propagate_down: false on the refused bottom: no diff asked there, no error
    net = sc.Net(text.replace("PROPAGATE", "propagate_down: true propagate_down: false"),
                 phase="train")
    assert flags_of(net, "take") == [KEEP, DETACH]
    net.loss(net.forward(a=a, i=torch.ones(2))).backward()
    assert net.params["w"][0].grad is None


def test_a_layer_without_backward_refuses_once_a_gradient_reaches_it():
    text = """
    name: "t"
    input: "a" input_shape { dim: 2 }
    layer { name: "w" type: "Scale" bottom: "a" top: "aw" scale_param { axis: 0 num_axes: 0 } }
    layer { name: "nb" type: "TestNoBackward" bottom: "aw" top: "y" }
    layer { name: "loss" type: "Power" bottom: "y" top: "loss" loss_weight: 1 }
    """
    net = sc.Net(text, phase="train")
    out = net.forward(a=torch.ones(2))
    with pytest.raises(NoBackwardError, match=r"nb \(TestNoBackward\) has no backward"):
        net.loss(out).backward()
    with torch.no_grad():      # a forward without gradients never asks
        net.forward(a=torch.ones(2))


def test_frozen_layers_need_no_backward_and_their_tops_no_diff():
    text = CHAIN.replace("PROPAGATE", "").replace(
        'bottom: "x" top: "h"', 'bottom: "x" top: "h" param { lr_mult: 0 } param { lr_mult: 0 }')
    net = sc.Net(text, phase="train")
    flags = net.backward_flags
    names = [r.name for r in net.records]
    assert not flags.layer_need[names.index("ip1")]
    assert flags.bottom_need[names.index("ip2")] == [False]   # nothing learnable below h
    assert flags.layer_need[names.index("ip2")]
    # the graph leaves h's gradient to autograd: the caller may still ask for x's gradient
    assert flags_of(net, "ip2") == [KEEP]
    x = torch.randn(2, 3, requires_grad=True)
    net.loss(net.forward(x=x)).backward()
    assert x.grad is not None and net.params["ip1"][0].grad is None


def test_backward_flags_leave_out_layers_that_reach_no_loss():
    text = """
    name: "t"
    input: "x" input_shape { dim: 2 dim: 3 }
    input: "label" input_shape { dim: 2 }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "s"
            inner_product_param { num_output: 3 } }
    layer { name: "acc" type: "Accuracy" bottom: "s" bottom: "label" top: "acc" }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "label" top: "loss" }
    """
    net = sc.Net(text, phase="train")
    flags = net.backward_flags
    need = dict(zip([r.name for r in net.records], flags.layer_need))
    assert need["ip"] and need["loss"] and need["s_ip_0_split"]
    assert not need["acc"] and not need["input"]


PROPAGATE_DOWN = """
name: "t"
force_backward: {force}
input: "a" input_shape {{ dim: 2 dim: 1 }}
input: "b" input_shape {{ dim: 2 dim: 1 }}
layer {{ name: "l" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"
        propagate_down: true propagate_down: false }}
"""


def test_propagate_down_false_gives_that_bottom_no_diff():
    net = sc.Net(PROPAGATE_DOWN.format(force="false"), phase="train")
    a = torch.ones(2, 1, requires_grad=True)
    b = torch.zeros(2, 1, requires_grad=True)
    net.loss(net.forward(a=a, b=b)).backward()
    torch.testing.assert_close(a.grad, torch.full((2, 1), 0.5))
    assert b.grad is None
    # force_backward overrides propagate_down (Caffe ORs in AllowForceBackward)
    net = sc.Net(PROPAGATE_DOWN.format(force="true"), phase="train")
    a = torch.ones(2, 1, requires_grad=True)
    b = torch.zeros(2, 1, requires_grad=True)
    net.loss(net.forward(a=a, b=b)).backward()
    torch.testing.assert_close(b.grad, torch.full((2, 1), -0.5))


def test_propagate_down_needs_one_entry_per_bottom():
    text = PROPAGATE_DOWN.format(force="false").replace("propagate_down: true ", "")
    with pytest.raises(sc.NetBuildError, match=r"l \(EuclideanLoss\): propagate_down must be given"):
        sc.Net(text, phase="train")
