"""Net-level rules found missing in review: loss_weight on a top another layer also reads (Caffe's
loss Split), and the prototxt's own NetState (stage/level)."""
import numpy as np
import pytest
import torch

import segaware_caffe as sc

LOSS_THEN_IN_PLACE = """
name: "t"
input: "data" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }
layer { name: "p" type: "Power" bottom: "data" top: "x" loss_weight: 2 power_param { shift: -10 } }
layer { name: "r" type: "ReLU" bottom: "x" top: "x" }
"""


def test_loss_weight_on_a_top_rewritten_in_place_uses_the_value_before_the_rewrite():
    # Caffe inserts x_p_0_split (top 0 carries the loss, top 1 feeds the ReLU), so the loss is
    # 2 * sum(data - 10) = -72, not 2 * sum(relu(data - 10)) = 0
    net = sc.Net(LOSS_THEN_IN_PLACE, phase="train")
    assert net.outputs == ["x", "x_p_0_split_0"]
    assert net.loss_weights == {"x_p_0_split_0": 2.0}
    out = net.forward(data=torch.ones(1, 1, 2, 2))
    assert float(net.loss(out)) == -72.0
    assert float(out["x"].sum()) == 0.0


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


def test_the_prototxt_state_selects_layers():
    text = """
    name: "t"
    state { stage: "deploy" level: 2 }
    input: "data" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }
    layer { name: "a" type: "ReLU" bottom: "data" top: "a" include { stage: "deploy" } }
    layer { name: "b" type: "ReLU" bottom: "data" top: "b" include { min_level: 1 } }
    layer { name: "c" type: "ReLU" bottom: "data" top: "c" include { stage: "extra" } }
    """
    def layers(net):
        return [r.name for r in net.records if r.origin == "prototxt"]
    assert layers(sc.Net(text)) == ["a", "b"]
    # given stages add to the file's, a given level replaces the file's
    assert layers(sc.Net(text, stages=("extra",), level=0)) == ["a", "c"]


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


def test_the_layer_timer_runs_a_net_with_a_loss_split():
    from segaware_caffe.tools.cmd_time import LayerTimer
    net = sc.Net(LOSS_THEN_IN_PLACE, phase="train")
    timer = LayerTimer(net, torch.device("cpu"))
    forward_ms, backward_ms = timer.forward_backward({"data": torch.ones(1, 1, 2, 2)})
    assert forward_ms >= 0 and backward_ms >= 0


def test_named_test_nets_need_no_test_interval(tmp_path):
    # Caffe asks for test_interval > 0 only for test nets made from the generic `net`
    from segaware_caffe.solver import Solver
    from tests.solver.toy_layers import TOY_NET
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text(
        'train_net: "net.prototxt" test_net: "net.prototxt" test_iter: 1 lr_policy: "fixed"')
    solver = Solver(tmp_path / "solver.prototxt")
    assert len(solver.test_nets) == 1


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


def test_test_nets_take_the_last_same_named_train_layer_like_caffe(tmp_path):
    # Net::ShareTrainedLayersWith walks the train layers in order and gives each one's data to
    # the first test layer of that name: with duplicate train names the last one wins
    from segaware_caffe.solver import Solver
    train = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 2 weight_filler { type: "constant" value: 3 } } }
    layer { name: "loss" type: "Power" bottom: "b" top: "loss" loss_weight: 1 }
    """
    test = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 2 } }
    """
    (tmp_path / "train.prototxt").write_text(train)
    (tmp_path / "test.prototxt").write_text(test)
    (tmp_path / "solver.prototxt").write_text(
        'train_net: "train.prototxt" test_net: "test.prototxt" test_iter: 1 lr_policy: "fixed"')
    solver = Solver(tmp_path / "solver.prototxt")
    solver._share_trained_layers(solver.test_nets[0])
    assert torch.equal(solver.test_nets[0].params["ip"][0], torch.full((2, 2), 3.0))


def test_net_forward_zeroes_element_0_of_outputs_no_layer_writes():
    # the fork's Net::Forward sets element 0 of every net output to 0 before the layers run: a
    # fed input that is an output (vgg deploy's `label`), a Reshape of an input (Reshape shares
    # its bottom's memory from set-up on, so every reader of the input sees the 0), a constant
    # DummyData top (an in-place layer then computes f(0) there) keep it; written outputs do not
    text = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 dim: 2 }
    input: "label" input_shape { dim: 1 dim: 4 }
    input: "y" input_shape { dim: 1 dim: 4 }
    input: "z" input_shape { dim: 1 dim: 4 }
    layer { name: "r" type: "Reshape" bottom: "x" top: "xr" reshape_param { shape { dim: 4 } } }
    layer { name: "q" type: "Power" bottom: "y" top: "q" power_param { scale: 3 } }
    layer { name: "dd" type: "DummyData" top: "c"
            dummy_data_param { shape { dim: 3 } data_filler { type: "constant" value: 1 } } }
    layer { name: "shift" type: "Power" bottom: "c" top: "c" power_param { shift: 5 } }
    layer { name: "rz" type: "Reshape" bottom: "z" top: "zr" reshape_param { shape { dim: 4 } } }
    layer { name: "pz" type: "Power" bottom: "z" top: "pz" power_param { scale: 2 } }
    """
    net = sc.Net(text)
    assert net.outputs == ["c", "label", "pz", "q", "xr", "zr"]
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    label = torch.tensor([[7.0, 8.0, 9.0, 10.0]])
    y = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = net.forward(outputs=["c", "label", "q", "xr", "x", "zr", "pz"], x=x, label=label, y=y, z=z)
    assert out["label"].tolist() == [[0.0, 8.0, 9.0, 10.0]]
    assert out["xr"].tolist() == [0.0, 2.0, 3.0, 4.0]
    assert out["x"].flatten().tolist() == [0.0, 2.0, 3.0, 4.0]
    assert out["q"].tolist() == [[3.0, 6.0, 9.0, 12.0]]             # y is no output: untouched
    assert out["c"].tolist() == [5.0, 6.0, 6.0]
    # z has two readers, so Caffe reads it through a Split; the Reshape shares the Split top's
    # memory from set-up, but the Split top takes z's memory only in its Forward, after the
    # zeroing: on the first pass no reader of z sees the 0
    assert out["zr"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert out["pz"].tolist() == [[2.0, 4.0, 6.0, 8.0]]
    assert label.tolist() == [[7.0, 8.0, 9.0, 10.0]]                # the caller's tensor is not
    out["xr"].sum().backward()                                       # the gradient passes as in Caffe
    assert x.grad.flatten().tolist() == [1.0, 1.0, 1.0, 1.0]


def test_blob_at_layer_names_a_version_before_in_place_rewrites():
    text = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 4 }
    layer { name: "p" type: "Power" bottom: "x" top: "y" power_param { shift: -2 } }
    layer { name: "r" type: "ReLU" bottom: "y" top: "y" }
    layer { name: "s" type: "Power" bottom: "y" top: "y" power_param { scale: 3 } }
    """
    net = sc.Net(text)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    out = net.forward(outputs=["y", "y@p", "y@r", "y@s"], x=x)
    assert out["y@p"].tolist() == [[-1.0, 0.0, 1.0, 2.0]]
    assert out["y@r"].tolist() == [[0.0, 0.0, 1.0, 2.0]]
    assert torch.equal(out["y@s"], out["y"])
    out["y@p"].retain_grad()
    out["y"].sum().backward()
    assert out["y@p"].grad.tolist() == [[0.0, 0.0, 3.0, 3.0]]    # Caffe's diff of y
    with pytest.raises(KeyError, match="BLOB@LAYER"):
        net.forward(outputs=["y@nope"], x=x)


def test_weights_go_to_the_first_layer_of_a_name_and_the_report_says_so():
    from segaware_caffe import caffe_proto
    text = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 2 } }
    layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 2 } }
    """
    source = sc.Net(text)
    with torch.no_grad():
        source.params["ip"][0].fill_(1.0)
    weights = source.to_weights_proto()
    # the file's second "ip" (read later) overwrites the first, as in Caffe
    weights.layer[1].blobs[0].CopyFrom(caffe_proto.array_to_blob(np.full((2, 2), 4.0, np.float32)))
    net = sc.Net(text)
    report = net.load_weights(weights)
    assert report.loaded == ["ip"] and report.not_in_weights == ["ip"]
    first, second = (r.module.caffe_blobs()[0] for r in net.records if r.name == "ip")
    assert torch.equal(first, torch.full((2, 2), 4.0))
    assert not torch.equal(second, torch.full((2, 2), 4.0))
