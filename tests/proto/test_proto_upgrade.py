"""V0 and V1 nets (hand-written old versions of BVLC reference nets) upgrade to exactly the current
versions in reference/bvlc; solver_type and legacy inputs upgrade like BVLC's upgrade_proto."""
import numpy as np
import pytest

from segaware_caffe.caffe_proto import (CaffeFormatError, caffe_pb2, net_format, read_net, read_solver,
                         read_weights, upgrade_net_input, weights_to_arrays)

ALEXNET_V1 = """
name: "AlexNet"
input: "data"
input_dim: 10 input_dim: 3 input_dim: 227 input_dim: 227
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "norm1" type: LRN bottom: "conv1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layers { name: "pool1" type: POOLING bottom: "norm1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layers { name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 } }
layers { name: "relu2" type: RELU bottom: "conv2" top: "conv2" }
layers { name: "norm2" type: LRN bottom: "conv2" top: "norm2"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layers { name: "pool2" type: POOLING bottom: "norm2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layers { name: "conv3" type: CONVOLUTION bottom: "pool2" top: "conv3"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 } }
layers { name: "relu3" type: RELU bottom: "conv3" top: "conv3" }
layers { name: "conv4" type: CONVOLUTION bottom: "conv3" top: "conv4"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2 } }
layers { name: "relu4" type: RELU bottom: "conv4" top: "conv4" }
layers { name: "conv5" type: CONVOLUTION bottom: "conv4" top: "conv5"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2 } }
layers { name: "relu5" type: RELU bottom: "conv5" top: "conv5" }
layers { name: "pool5" type: POOLING bottom: "conv5" top: "pool5"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layers { name: "fc6" type: INNER_PRODUCT bottom: "pool5" top: "fc6"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  inner_product_param { num_output: 4096 } }
layers { name: "relu6" type: RELU bottom: "fc6" top: "fc6" }
layers { name: "drop6" type: DROPOUT bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layers { name: "fc7" type: INNER_PRODUCT bottom: "fc6" top: "fc7"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  inner_product_param { num_output: 4096 } }
layers { name: "relu7" type: RELU bottom: "fc7" top: "fc7" }
layers { name: "drop7" type: DROPOUT bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.5 } }
layers { name: "fc8" type: INNER_PRODUCT bottom: "fc7" top: "fc8"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  inner_product_param { num_output: 1000 } }
layers { name: "prob" type: SOFTMAX bottom: "fc8" top: "prob" }
"""

# LeNet train/test as V1 with the data-layer scale still inside data_param (pre-transform_param)
LENET_V1 = """
name: "LeNet"
layers { name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "examples/mnist/mnist_train_lmdb" batch_size: 64 backend: LMDB
               scale: 0.00390625 }
  include { phase: TRAIN } }
layers { name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "examples/mnist/mnist_test_lmdb" batch_size: 100 backend: LMDB
               scale: 0.00390625 }
  include { phase: TEST } }
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2" blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 50 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layers { name: "pool2" type: POOLING bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool2" top: "ip1" blobs_lr: 1 blobs_lr: 2
  inner_product_param { num_output: 500
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers { name: "ip2" type: INNER_PRODUCT bottom: "ip1" top: "ip2" blobs_lr: 1 blobs_lr: 2
  inner_product_param { num_output: 10
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layers { name: "accuracy" type: ACCURACY bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip2" bottom: "label" top: "loss" }
"""

# CaffeNet deploy in the 2013 V0 format: flat fields, lower-case types, padding layers
CAFFENET_V0 = """
name: "CaffeNet"
input: "data"
input_dim: 10 input_dim: 3 input_dim: 227 input_dim: 227
layers { layer { name: "conv1" type: "conv" num_output: 96 kernelsize: 11 stride: 4 }
  bottom: "data" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: MAX kernelsize: 3 stride: 2 }
  bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 5 alpha: 0.0001 beta: 0.75 }
  bottom: "pool1" top: "norm1" }
layers { layer { name: "pad2" type: "padding" pad: 2 } bottom: "norm1" top: "pad2" }
layers { layer { name: "conv2" type: "conv" num_output: 256 kernelsize: 5 group: 2 }
  bottom: "pad2" top: "conv2" }
layers { layer { name: "relu2" type: "relu" } bottom: "conv2" top: "conv2" }
layers { layer { name: "pool2" type: "pool" pool: MAX kernelsize: 3 stride: 2 }
  bottom: "conv2" top: "pool2" }
layers { layer { name: "norm2" type: "lrn" local_size: 5 alpha: 0.0001 beta: 0.75 }
  bottom: "pool2" top: "norm2" }
layers { layer { name: "pad3" type: "padding" pad: 1 } bottom: "norm2" top: "pad3" }
layers { layer { name: "conv3" type: "conv" num_output: 384 kernelsize: 3 }
  bottom: "pad3" top: "conv3" }
layers { layer { name: "relu3" type: "relu" } bottom: "conv3" top: "conv3" }
layers { layer { name: "pad4" type: "padding" pad: 1 } bottom: "conv3" top: "pad4" }
layers { layer { name: "conv4" type: "conv" num_output: 384 kernelsize: 3 group: 2 }
  bottom: "pad4" top: "conv4" }
layers { layer { name: "relu4" type: "relu" } bottom: "conv4" top: "conv4" }
layers { layer { name: "pad5" type: "padding" pad: 1 } bottom: "conv4" top: "pad5" }
layers { layer { name: "conv5" type: "conv" num_output: 256 kernelsize: 3 group: 2 }
  bottom: "pad5" top: "conv5" }
layers { layer { name: "relu5" type: "relu" } bottom: "conv5" top: "conv5" }
layers { layer { name: "pool5" type: "pool" pool: MAX kernelsize: 3 stride: 2 }
  bottom: "conv5" top: "pool5" }
layers { layer { name: "fc6" type: "innerproduct" num_output: 4096 } bottom: "pool5" top: "fc6" }
layers { layer { name: "relu6" type: "relu" } bottom: "fc6" top: "fc6" }
layers { layer { name: "drop6" type: "dropout" dropout_ratio: 0.5 } bottom: "fc6" top: "fc6" }
layers { layer { name: "fc7" type: "innerproduct" num_output: 4096 } bottom: "fc6" top: "fc7" }
layers { layer { name: "relu7" type: "relu" } bottom: "fc7" top: "fc7" }
layers { layer { name: "drop7" type: "dropout" dropout_ratio: 0.5 } bottom: "fc7" top: "fc7" }
layers { layer { name: "fc8" type: "innerproduct" num_output: 1000 } bottom: "fc7" top: "fc8" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc8" top: "prob" }
"""


def _assert_same_layers(got, want):
    assert len(got) == len(want)
    for mine, theirs in zip(got, want):
        assert mine == theirs, f"\nupgraded:\n{mine}\nreference:\n{theirs}"


def _reference(reference, name):
    return read_net(reference / "bvlc" / name)


def test_v1_alexnet_upgrades_to_the_reference(reference):
    assert net_format(read_net(ALEXNET_V1, upgrade=False)) == "V1"
    net = read_net(ALEXNET_V1)
    want = _reference(reference, "bvlc_alexnet_deploy.prototxt")
    assert net.name == want.name
    # legacy inputs are kept unless asked for
    assert list(net.input) == ["data"] and list(net.input_dim) == [10, 3, 227, 227]
    _assert_same_layers(net.layer, want.layer[1:])
    upgraded = read_net(ALEXNET_V1, upgrade_inputs=True)
    assert not len(upgraded.input) and not len(upgraded.input_dim)
    first = upgraded.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["data"])
    assert first.input_param == want.layer[0].input_param
    _assert_same_layers(upgraded.layer[1:], want.layer[1:])


def test_v1_lenet_with_data_param_transformations_upgrades_to_the_reference(reference):
    net = read_net(LENET_V1)
    want = _reference(reference, "mnist_lenet_train_test.prototxt")
    assert net == want


def test_v0_caffenet_with_padding_layers_upgrades_to_the_reference(reference):
    assert net_format(read_net(CAFFENET_V0, upgrade=False)) == "V0"
    net = read_net(CAFFENET_V0, upgrade_inputs=True)
    want = _reference(reference, "bvlc_reference_caffenet_deploy.prototxt")
    assert net.layer[0].input_param == want.layer[0].input_param
    _assert_same_layers(net.layer[1:], want.layer[1:])


def test_v0_weights_and_solver_type(tmp_path):
    v0 = caffe_pb2.NetParameter(name="tiny", input=["data"])
    connection = v0.layers.add(bottom=["data"], top=["ip"])
    connection.layer.name, connection.layer.type = "ip", "innerproduct"
    connection.layer.num_output = 2
    connection.layer.blobs_lr.extend([1, 2])
    connection.layer.weight_decay.extend([1, 0])
    weight = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    blob = connection.layer.blobs.add(num=1, channels=1, height=2, width=3)
    blob.data.extend(weight.ravel().tolist())
    net = read_weights(v0.SerializeToString())
    layer = net.layer[0]
    assert (layer.name, layer.type, layer.inner_product_param.num_output) == ("ip", "InnerProduct", 2)
    assert [(p.lr_mult, p.decay_mult) for p in layer.param] == [(1, 1), (2, 0)]
    assert np.array_equal(weights_to_arrays(net)["ip"][0], weight)

    solver = read_solver('net: "x.prototxt" solver_type: ADAM base_lr: 0.1')
    assert solver.type == "Adam" and not solver.HasField("solver_type")
    with pytest.raises(CaffeFormatError, match="both the old `solver_type` .ADAGRAD. and the new `type`"):
        read_solver('solver_type: ADAGRAD type: "AdaGrad"')


def test_v1_param_names_share_modes_and_all_param_messages():
    net = read_net("""
      layers { name: "a" type: INNER_PRODUCT bottom: "x" top: "a" param: "w" param: ""
               blob_share_mode: PERMISSIVE blobs_lr: 0 loss_weight: 2
               inner_product_param { num_output: 3 } exclude { phase: TEST } }
      layers { name: "e" type: ELTWISE bottom: "a" bottom: "a" top: "e"
               eltwise_param { operation: MAX } }
      layers { name: "d" type: DECONVOLUTION bottom: "e" top: "d"
               convolution_param { num_output: 1 kernel_size: 2 } }
      layers { name: "s" type: SLICE bottom: "d" top: "s1" top: "s2" slice_param { slice_dim: 1 } }""")
    a = net.layer[0]
    assert [p.name for p in a.param] == ["w", ""]
    assert a.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE and a.param[0].lr_mult == 0
    assert list(a.loss_weight) == [2] and a.exclude[0].phase == caffe_pb2.TEST
    assert [l.type for l in net.layer] == ["InnerProduct", "Eltwise", "Deconvolution", "Slice"]
    assert net.layer[1].eltwise_param.operation == caffe_pb2.EltwiseParameter.MAX
    assert net.layer[3].slice_param.slice_dim == 1


def test_v0_misplaced_field_is_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="V0 layer 'r' .relu.: field num_output does not apply"):
        net = read_net('input: "x" layers { layer { name: "r" type: "relu" num_output: 3 } '
                       'bottom: "x" top: "x" }')
    assert net.layer[0].type == "ReLU" and not net.layer[0].HasField("convolution_param")


def test_upgrade_net_input_from_shapes_and_dims():
    net = read_net('input: "a" input_shape { dim: 1 dim: 2 } input: "b" input_shape { dim: 3 }'
                   ' layer { name: "s" type: "Silence" bottom: "a" bottom: "b" }')
    upgrade_net_input(net)
    assert [l.name for l in net.layer] == ["input", "s"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2], [3]]
    bare = caffe_pb2.NetParameter(input=["data"])  # an old caffemodel: names only
    upgrade_net_input(bare)
    assert not len(bare.layer) and not len(bare.input)
