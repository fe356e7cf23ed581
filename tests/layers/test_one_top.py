"""Layers that may have several tops, used with one: the top is one tensor that the next layer
consumes (an explicit Split with one top used to hand its consumer a tuple)."""
import pytest
import torch

import segaware_caffe as sc

INPUT = 'input: "x" input_shape { dim: 2 dim: 4 dim: 3 dim: 5 }\n'
LABEL = 'input: "label" input_shape { dim: 2 dim: 1 dim: 3 dim: 5 }\n'
CONSUMER = 'layer { name: "after" type: "Power" bottom: "%s" top: "after" power_param { scale: 2 } }'

ONE_TOP = {
    "Split": 'layer { name: "s" type: "Split" bottom: "x" top: "t" }',
    "Slice": 'layer { name: "s" type: "Slice" bottom: "x" top: "t" slice_param { axis: 1 } }',
    "Convolution": 'layer { name: "s" type: "Convolution" bottom: "x" top: "t" '
                   'convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" } } }',
    "Pooling": 'layer { name: "s" type: "Pooling" bottom: "x" top: "t" '
               'pooling_param { pool: MAX kernel_size: 2 stride: 1 } }',
    "DummyData": 'layer { name: "s" type: "DummyData" top: "t" '
                 'dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 1.5 } } }',
}


@pytest.mark.parametrize("layer_type", sorted(ONE_TOP))
def test_one_top_is_a_tensor_for_its_consumer(layer_type):
    net = sc.Net(INPUT + ONE_TOP[layer_type] + "\n" + CONSUMER % "t")
    x = torch.randn(2, 4, 3, 5)
    out = net.forward(outputs=["t", "after"], x=x)
    assert isinstance(out["t"], torch.Tensor)
    torch.testing.assert_close(out["after"], 2 * out["t"])
    if layer_type in ("Split", "Slice"):
        torch.testing.assert_close(out["t"], x)


def test_explicit_split_with_one_top_passes_the_gradient():
    net = sc.Net(INPUT + 'force_backward: true\n' + ONE_TOP["Split"] + "\n" + CONSUMER % "t")
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    net.forward(outputs=["after"], x=x)["after"].sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("text, top", [
    ('layer { name: "a" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" }', "acc"),
    ('layer { name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" }', "loss"),
])
def test_one_top_of_label_layers(text, top):
    net = sc.Net(INPUT + LABEL + text + "\n" + CONSUMER % top)
    label = torch.randint(0, 4, (2, 1, 3, 5)).float()
    out = net.forward(outputs=[top, "after"], x=torch.randn(2, 4, 3, 5), label=label)
    assert isinstance(out[top], torch.Tensor) and out[top].shape == ()
    torch.testing.assert_close(out["after"], 2 * out[top])


def test_split_module_returns_a_tuple_for_several_tops():
    from segaware_caffe.layers.split import Split
    x = torch.randn(3)
    one, many = Split(num_tops=1)(x), Split(num_tops=3)(x)
    assert isinstance(one, torch.Tensor) and isinstance(many, tuple) and len(many) == 3
