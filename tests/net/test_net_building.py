"""Net-level rules (SEMANTICS §11) with small layer types registered here, independent of the
library's layers: filtering, inputs, in-place tops, split naming, sharing, weights, errors."""
import warnings

import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.layer import CaffeLayer, register_layer


@register_layer("TestMulWeight")
class MulWeight(CaffeLayer):
    """y = x * w (w of shape (C,)), used to exercise parameters."""
    CAFFE_BLOBS = ("weight",)

    def __init__(self, *, channels, value):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((channels,), float(value)))

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls(channels=ctx.bottom_shapes[0][1], value=2.0)

    def forward(self, x):
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


@register_layer("TestAdd")
class Add(CaffeLayer):
    BOTTOMS = (2, 2)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        if ctx.bottom_shapes[0] != ctx.bottom_shapes[1]:
            raise ctx.error(f"bottoms must have equal shapes, got {ctx.bottom_shapes}")
        return cls()

    def forward(self, a, b):
        return a + b


@register_layer("TestSumLoss")
class SumLoss(CaffeLayer):
    IS_LOSS = True

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls()

    def forward(self, x):
        return x.sum()


NET = """
name: "tiny"
input: "data"
input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }
layer { name: "a" type: "TestMulWeight" bottom: "data" top: "a" param { lr_mult: 2 decay_mult: 0 name: "shared_w" } }
layer { name: "relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "TestMulWeight" bottom: "a" top: "b" param { name: "shared_w" } }
layer { name: "c" type: "TestAdd" bottom: "a" bottom: "b" top: "c" }
layer { name: "train_only" type: "TestSumLoss" bottom: "c" top: "loss" include { phase: TRAIN } }
layer { name: "staged" type: "ReLU" bottom: "c" top: "staged" include { stage: "extra" } }
layer { name: "leveled" type: "ReLU" bottom: "c" top: "leveled" exclude { min_level: 1 } }
"""


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


def test_weights_round_trip_and_reports(tmp_path):
    net = sc.Net(NET)
    with torch.no_grad():
        net.params["a"][0].copy_(torch.tensor([1.0, -2.0, 3.0]))
    path = tmp_path / "tiny.caffemodel"
    net.save_weights(path)
    other = sc.Net(NET)
    report = other.load_weights(path)
    torch.testing.assert_close(other.params["a"][0], torch.tensor([1.0, -2.0, 3.0]))
    assert report.loaded == ["a", "b"]
    # a weights file with a layer the net lacks: reported, not silently dropped
    proto = net.to_weights_proto()
    extra = proto.layer.add()
    extra.name, extra.type = "ghost", "TestMulWeight"
    extra.blobs.add().CopyFrom(proto.layer[0].blobs[0])
    with pytest.warns(UserWarning, match="ghost"):
        sc.Net(NET, weights=proto)


def test_weights_with_wrong_shape_name_the_layer():
    net = sc.Net(NET)
    proto = net.to_weights_proto()
    blob = proto.layer[0].blobs[0]
    del blob.data[:]
    blob.data.extend([1.0, 2.0])
    blob.shape.dim[:] = [2]
    with pytest.raises(sc.NetBuildError, match=r"layer a \(TestMulWeight\) blob 0 \(weight\) has shape \(2,\) in the weights file, the net expects \(3,\)"):
        net.load_weights(proto)


def test_legacy_4d_blob_shape_fits_a_1d_param():
    net = sc.Net(NET)
    proto = net.to_weights_proto()
    blob = proto.layer[0].blobs[0]
    blob.ClearField("shape")
    blob.num, blob.channels, blob.height, blob.width = 1, 1, 1, 3
    net.load_weights(proto)


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
