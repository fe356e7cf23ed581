"""What every layer class shares (segaware_caffe.layer.CaffeLayer): the recorded constructor
configuration and the facts the builder reads, with defaults a new layer type needs none of."""
import copy

import pytest
import torch

import segaware_caffe as sc
import segaware_caffe.layers  # noqa: F401  (registers every layer type before collection)
from segaware_caffe.layer import CaffeLayer, layer_class, registered_types


def test_every_built_layer_keeps_the_keyword_arguments_it_was_built_with():
    net = sc.Net("""
    input: "x" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
    layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
            convolution_param { num_output: 3 kernel_size: 3 pad: 1 group: 1 } }
    layer { name: "pool" type: "Pooling" bottom: "c" top: "p"
            pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
    """)
    for record in net.records:
        config = record.module.config
        assert isinstance(config, dict), record.name
        rebuilt = type(record.module)(**config)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
            {k: v.shape for k, v in record.module.state_dict().items()}, record.name
    conv = net.layers["conv"].config
    assert conv["kernel"] == (3, 3) and conv["pad"] == (1, 1) and conv["weight_shape"] == (3, 2, 3, 3)
    conv["kernel"] = (1, 1)                          # a copy: the layer's record is unchanged
    assert net.layers["conv"].config["kernel"] == (3, 3)
    assert copy.deepcopy(net.layers["pool"]).config == net.layers["pool"].config


def test_positional_construction_has_no_config():
    class Positional(CaffeLayer):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale
    assert Positional(2).config is None
    assert Positional(scale=2).config == {"scale": 2}


def test_facts_have_defaults_that_fit_an_ordinary_layer():
    class Plain(CaffeLayer):
        pass
    layer = Plain()
    assert (Plain.HAS_BACKWARD, Plain.NET_INPUT, Plain.SHARES_BOTTOM_DATA,
            Plain.USES_SEGAWARE_KERNELS, Plain.IGNORES_PROPAGATE_DOWN) == (True, False, False, False, ())
    assert not layer.constant_top(0) and not layer.top_shares_bottom(0, 1)
    assert Plain.allow_force_backward(1, 2) and not layer.refuses_gradient(1, 2)
    assert layer.has_backward()


@pytest.mark.parametrize("type_name", registered_types())
def test_loss_layers_refuse_force_backward_only_where_caffe_does(type_name):
    cls = layer_class(type_name)
    if cls.IS_LOSS and cls.NO_FORCE_BACKWARD is None:
        assert not cls.allow_force_backward(1, 2) and cls.allow_force_backward(0, 2)
    if not cls.IS_LOSS and cls.NO_FORCE_BACKWARD is None:
        assert all(cls.allow_force_backward(i, 3) for i in range(3))


def test_declared_facts_of_the_library_layers():
    assert layer_class("Input").NET_INPUT
    assert layer_class("Reshape").SHARES_BOTTOM_DATA
    assert not layer_class("Split").SHARES_BOTTOM_DATA      # shares only in its Forward
    assert layer_class("Im2dist").IGNORES_PROPAGATE_DOWN == (0,)
    assert layer_class("NormConvMeanfield").IGNORES_PROPAGATE_DOWN == (0, 1, 2, 3)
    assert not layer_class("Im2parity").HAS_BACKWARD
    assert layer_class("EuclideanLoss").allow_force_backward(1, 2)
    net = sc.Net('layer { name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
                 'shape { dim: 2 } data_filler { type: "constant" } data_filler { type: "gaussian" } } }')
    dummy = net.layers["d"]
    assert dummy.constant_top(0) and not dummy.constant_top(1)
    slice_one = sc.Net('input: "x" input_shape { dim: 2 dim: 4 } layer { name: "s" type: "Slice" '
                       'bottom: "x" top: "y" }').layers["s"]
    assert slice_one.top_shares_bottom(0, 1)
    assert torch.equal(slice_one(torch.ones(2, 4)), torch.ones(2, 4))
