"""Loss weights as Caffe sets them: defaults of loss layers, the loss Split that InsertSplits gives
a loss top other layers also read (its weight on split 0, the layer's own list cleared), and
anonymous loss tops."""
import pytest
import torch

import segaware_caffe as sc


LOSS_THEN_READ = """
name: "t"
input: "data" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }
layer { name: "p" type: "Power" bottom: "data" top: "x" loss_weight: 2 power_param { shift: -10 } }
layer { name: "r" type: "ReLU" bottom: "x" top: "y" }
"""


def test_loss_weight_on_a_top_another_layer_reads_uses_the_split():
    # Caffe inserts x_p_0_split (top 0 carries the loss, top 1 feeds the ReLU), so the loss is
    # 2 * sum(data - 10) = -72
    net = sc.Net(LOSS_THEN_READ, phase="train")
    assert net.outputs == ["x_p_0_split_0", "y"]
    assert net.loss_weights == {"x_p_0_split_0": 2.0}
    out = net.forward(data=torch.ones(1, 1, 2, 2))
    assert float(net.loss(out)) == -72.0
    assert float(out["y"].sum()) == 0.0


def test_a_loss_top_rewritten_in_place_is_refused_like_caffe():
    # the loss counts as a reader of x, so InsertSplits feeds the ReLU x_p_0_split_1: it is no
    # longer in place, and Caffe's Net::Init stops ("Top blob 'x' produced by multiple sources")
    with pytest.raises(sc.NetBuildError, match=r"r \(ReLU\): top blob 'x' is produced by multiple "
                                               r"sources: layer 'p' \(Power\) already produces it\. "
                                               r"The layer is in place on 'x' in the prototxt"):
        sc.Net(LOSS_THEN_READ.replace('top: "y"', 'top: "x"'), phase="train")


def test_loss_split_readers_are_numbered_from_one():
    text = """
    name: "t"
    input: "data" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }
    layer { name: "p" type: "Power" bottom: "data" top: "x" loss_weight: 1 }
    layer { name: "a" type: "Power" bottom: "x" top: "a" power_param { scale: 2 } }
    layer { name: "b" type: "Power" bottom: "x" top: "b" power_param { scale: 3 } }
    """
    net = sc.Net(text, phase="train")
    assert net.outputs == ["a", "b", "x_p_0_split_0"]
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    out = net.forward(outputs=["x_p_0_split_0", "x_p_0_split_1", "x_p_0_split_2", "a"], data=x)
    for k in range(3):
        torch.testing.assert_close(out[f"x_p_0_split_{k}"], x)
    torch.testing.assert_close(out["a"], 2 * x)


def test_a_loss_split_clears_the_layers_own_loss_weights_like_caffe():
    # InsertSplits clears the layer's loss_weight list; a loss layer then takes its default 1
    # on top 0 again, so Caffe counts this loss 1 + 2 = 3 times
    text = """
    name: "t"
    input: "a" input_shape { dim: 2 dim: 1 }
    input: "b" input_shape { dim: 2 dim: 1 }
    layer { name: "l" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l" loss_weight: 2 }
    layer { name: "p" type: "Power" bottom: "l" top: "p" }
    """
    net = sc.Net(text, phase="train")
    assert net.loss_weights == {"l": 1.0, "l_l_0_split_0": 2.0}
    out = net.forward(outputs=sorted(net.loss_weights), a=torch.ones(2, 1), b=torch.zeros(2, 1))
    torch.testing.assert_close(float(net.loss(out)), 3 * 0.5)


def test_an_automatic_loss_top_is_no_net_output_but_still_a_loss():
    text = """
    name: "t"
    input: "data" input_shape { dim: 2 dim: 3 dim: 1 dim: 1 }
    input: "label" input_shape { dim: 2 dim: 1 dim: 1 dim: 1 }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" }
    """
    net = sc.Net(text, phase="train")
    assert net.outputs == []
    assert list(net.loss_weights.values()) == [1.0]
    out = net.forward(outputs=list(net.loss_weights), data=torch.zeros(2, 3, 1, 1),
                      label=torch.zeros(2, 1, 1, 1))
    torch.testing.assert_close(float(net.loss(out)), float(torch.log(torch.tensor(3.0))))
