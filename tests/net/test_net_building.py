"""Net-level rules with small layer types registered here, independent of the library's layers:
filtering, inputs, in-place tops and BLOB@LAYER versions, split naming, sharing, errors."""
import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.layer import CaffeLayer, register_layer
from tests.net.toy_net import NET


def prototxt_layers(net):
    return [r.name for r in net.records if r.origin == "prototxt"]


def test_phase_stage_level_filtering():
    test_net = sc.Net(NET, phase="test")
    assert prototxt_layers(test_net) == ["a", "relu", "b", "c", "leveled"]
    # as Caffe builds it: the legacy inputs' Input layer, and a Split where a blob has two readers
    assert [r.name for r in test_net.records] == ["input", "a", "relu", "a_relu_0_split", "b", "c",
                                                  "leveled"]
    train_net = sc.Net(NET, phase="train", stages=["extra"], level=1)
    assert prototxt_layers(train_net) == ["a", "relu", "b", "c", "train_only", "staged"]
    assert "c_c_0_split" in [r.name for r in train_net.records]
    assert train_net.loss_weights == {"loss": 1.0}
    assert train_net.outputs == ["loss", "staged"]   # blobs nobody consumes, alphabetical


def test_include_and_exclude_together_is_an_error():
    bad = NET.replace('include { phase: TRAIN }', 'include { phase: TRAIN } exclude { phase: TEST }')
    with pytest.raises(sc.NetBuildError, match=r"train_only \(TestSumLoss\): specify either include or exclude"):
        sc.Net(bad)


def test_forward_in_place_split_names_and_any_input_size():
    net = sc.Net(NET)
    x = torch.randn(1, 3, 7, 9)
    out = net.forward(outputs=["a", "c", "a_relu_0_split_0", "a_relu_0_split_1", "data"], data=x)
    a = torch.relu(x * 2)
    torch.testing.assert_close(out["a"], a)            # the final value of an in-place blob
    torch.testing.assert_close(out["c"], a + a * 2)
    torch.testing.assert_close(out["a_relu_0_split_1"], a)
    assert set(net.forward(data=x)) == {"leveled"}


def test_shared_parameters_are_one_tensor_with_owner_multipliers():
    net = sc.Net(NET)
    assert net.params["a"][0] is net.params["b"][0]
    assert len(net.learnable_params) == 1
    p = net.learnable_params[0]
    assert (p.lr_mult, p.decay_mult) == (2.0, 0.0)


def test_sharing_with_conflicting_multipliers_is_an_error():
    bad = NET.replace('param { name: "shared_w" } }', 'param { name: "shared_w" lr_mult: 3 } }')
    with pytest.raises(sc.NetBuildError, match=r"b \(TestMulWeight\): shared param 'shared_w' has lr_mult 3.0 here but 2.0 in a"):
        sc.Net(bad)


def test_gradients_flow_through_shared_params_and_splits():
    net = sc.Net(NET, phase="train")
    x = torch.randn(2, 3, 4, 5)
    out = net.forward(data=x)
    net.loss(out).backward()
    w = net.learnable_params[0]
    # the same loss written directly, with one shared w:
    w2 = w.detach().clone().requires_grad_(True)
    a = torch.relu(x * w2.view(1, -1, 1, 1))
    (a + a * w2.view(1, -1, 1, 1)).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("text, message", [
    ('input: "data" input_shape { dim: 1 dim: 3 }\nlayer { name: "r" type: "ReLU" bottom: "nope" top: "r" }',
     r"r \(ReLU\): bottom blob 'nope' is not produced by any earlier layer or net input \(known blobs: data\)"),
    ('input: "data" input_shape { dim: 1 dim: 3 }\nlayer { name: "r" type: "Relu" bottom: "data" top: "r" }',
     r"r \(Relu\): unknown layer type 'Relu' \(did you mean ReLU\?\)\. Supported types: .*ReLU"),
    ('input: "data" input_shape { dim: 1 dim: 3 }\nlayer { name: "s" type: "TestAdd" bottom: "data" top: "s" }',
     r"s \(TestAdd\): takes exactly 2 bottom blob\(s\), got 1"),
    ('input: "data" input_shape { dim: 1 dim: 3 }\nlayer { name: "l" type: "TestSumLoss" bottom: "data" top: "l" loss_weight: 1 loss_weight: 2 }',
     r"l \(TestSumLoss\): loss_weight must be given for every top or none"),
    ('input: "data" input: "other" input_shape { dim: 1 dim: 3 }',
     r"2 inputs but 1 input_shape entries"),
    ('input: "data" input_dim: 1 input_dim: 3',
     r"1 inputs need 4 input_dim values, got 2"),
    ('input: "a" input_shape { dim: 1 dim: 3 } input: "b" input_shape { dim: 1 dim: 4 }\n'
     'layer { name: "s" type: "TestAdd" bottom: "a" bottom: "b" top: "s" }',
     r"s \(TestAdd\): bottoms must have equal shapes"),
])
def test_build_errors_name_the_layer(text, message):
    with pytest.raises(sc.NetBuildError, match=message):
        sc.Net(text)


def test_forward_input_errors():
    net = sc.Net(NET)
    with pytest.raises(KeyError, match="input 'data' not given"):
        net.forward()
    with pytest.raises(KeyError, match="'label' is not an input of this net"):
        net.forward(data=torch.zeros(1, 3, 2, 2), label=torch.zeros(1))
    with pytest.raises(KeyError, match="no blob named 'nothing'"):
        net.forward(outputs=["nothing"], data=torch.zeros(1, 3, 2, 2))


def test_input_layer_and_legacy_input_dim():
    net = sc.Net('layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 1 dim: 2 } } }\n'
                 'layer { name: "s" type: "TestAdd" bottom: "x" bottom: "y" top: "s" }')
    assert net.input_names == ["x", "y"]
    assert net.input_shapes["y"] == (1, 2)
    out = net.forward(x=torch.ones(1, 2), y=torch.ones(1, 2))
    assert out["s"].tolist() == [[2.0, 2.0]]
    legacy = sc.Net('input: "x" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4\n'
                    'layer { name: "r" type: "ReLU" bottom: "x" top: "r" }')
    assert legacy.input_shapes["x"] == (1, 2, 3, 4)


def test_register_layer_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_layer("ReLU")(type("Other", (CaffeLayer,), {}))


def test_user_layer_type_runs_in_a_net():
    @sc.register_layer("TestUserDouble")
    class Double(CaffeLayer):
        @classmethod
        def from_proto(cls, layer_param, ctx):
            return cls()

        def forward(self, x):
            return 2 * x
    net = sc.Net('input: "x" input_shape { dim: 2 }\nlayer { name: "d" type: "TestUserDouble" bottom: "x" top: "y" }')
    assert net.forward(x=torch.tensor([1.0, 2.0]))["y"].tolist() == [2.0, 4.0]


def test_lr_mult_zero_freezes_unless_force_backward():
    frozen = NET.replace("lr_mult: 2", "lr_mult: 0")
    assert not sc.Net(frozen).learnable_params[0].requires_grad
    forced = "force_backward: true\n" + frozen
    assert sc.Net(forced).learnable_params[0].requires_grad


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


@pytest.mark.parametrize("text", [
    'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }',                     # no parameters
    'layer { name: "s" type: "Scale" bottom: "x" top: "y" scale_param { axis: 0 num_axes: 0 } }',
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_floating_inputs_take_the_nets_dtype_with_or_without_parameters(text, dtype):
    net = sc.Net('input: "x" input_shape { dim: 2 dim: 3 } ' + text, dtype=dtype)
    for given in (np.full((2, 3), -0.5), np.ones((2, 3), np.float16), torch.ones(2, 3, dtype=torch.float64)):
        assert net.forward(x=given)["y"].dtype == dtype
    if "ReLU" in text:      # integers are not cast
        assert net.forward(x=np.ones((2, 3), np.int64))["y"].dtype == torch.int64
    # .to() moves the dtype inputs are cast to, also for a net without parameters
    other = torch.float64 if dtype == torch.float32 else torch.float32
    assert net.to(other).forward(x=np.ones((2, 3)))["y"].dtype == other
