"""MemoryData through net.set_input_arrays (pycaffe's API): batches advance and wrap, the tops
alias the arrays handed in, transform_param is ignored there, errors."""
import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.data.images import DataError

NET = '''name: "mem"
layer {{ name: "mem" type: "MemoryData" top: "data" top: "label" {transform}
        memory_data_param {{ batch_size: {batch} channels: 2 height: 3 width: 5 }} }}'''


def make(batch=2, transform="", **kwargs):
    return sc.Net(NET.format(batch=batch, transform=transform), **kwargs)


def arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 2, 3, 5)).astype(np.float32),
            rng.integers(0, 9, n).astype(np.float32))


def test_shapes_at_build():
    net = make(batch=3)
    assert net.blob_shapes == {"data": (3, 2, 3, 5), "label": (3, 1, 1, 1)}


def test_batches_advance_and_wrap():
    net = make(batch=2)
    data, labels = arrays(6)
    net.set_input_arrays(data, labels)
    for step in range(7):
        start = 2 * step % 6
        out = net.forward()
        np.testing.assert_array_equal(out["data"].numpy(), data[start:start + 2])
        np.testing.assert_array_equal(out["label"].numpy(), labels[start:start + 2].reshape(2, 1, 1, 1))


def test_tops_alias_the_arrays_handed_in():
    net = make(batch=2)
    data, labels = arrays(4)
    net.set_input_arrays(data, labels)
    data[0] += 100           # changed after handing in: Caffe's tops point at this memory
    labels[1] = -5
    out = net.forward()
    np.testing.assert_array_equal(out["data"].numpy()[0], data[0])
    assert out["label"][1].item() == -5


def test_other_dtypes_and_layouts_are_copied():
    net = make(batch=2)
    data, labels = arrays(2)
    source = data.astype(np.float64)
    net.set_input_arrays(source, labels.astype(np.int64).reshape(2, 1, 1, 1))
    source[0] = 0
    out = net.forward()
    np.testing.assert_array_equal(out["data"].numpy(), data)   # taken when handed in
    np.testing.assert_array_equal(out["label"].numpy().ravel(), labels.astype(np.int64))


def test_a_new_hand_in_starts_at_its_first_item():
    net = make(batch=1)
    net.set_input_arrays(*arrays(3, seed=1))
    net.forward()
    data, labels = arrays(2, seed=2)
    net.set_input_arrays(data, labels)
    np.testing.assert_array_equal(net.forward()["data"].numpy(), data[:1])


def test_torch_tensors_and_float64_nets():
    net = make(batch=2, dtype=torch.float64)
    data, labels = arrays(4)
    net.layers["mem"].set_input_arrays(torch.from_numpy(data), torch.from_numpy(labels))
    out = net.forward()
    assert out["data"].dtype == torch.float64
    np.testing.assert_array_equal(out["data"].numpy(), data[:2].astype(np.float64))


def test_transform_param_is_ignored_with_a_warning():
    net = make(batch=2, transform="transform_param { scale: 10 mean_value: 1 }")
    data, labels = arrays(2)
    with pytest.warns(UserWarning, match="transform_param does not apply"):
        net.set_input_arrays(data, labels)
    np.testing.assert_array_equal(net.forward()["data"].numpy(), data)


def test_forward_before_hand_in_says_what_to_call():
    with pytest.raises(DataError, match=r"mem \(MemoryData\): no arrays.*set_input_arrays"):
        make().forward()


@pytest.mark.parametrize("data_shape, label_shape, message", [
    ((4, 2, 3, 4), (4,), r"data must be \(N, 2, 3, 5\).*got \(4, 2, 3, 4\)"),
    ((4, 2, 3), (4,), r"data must be \(N, 2, 3, 5\)"),
    ((4, 2, 3, 5), (4, 2), r"labels must be \(N,\) or \(N, 1, 1, 1\)"),
    ((4, 2, 3, 5), (3,), "data has 4 items but labels has 3"),
    ((3, 2, 3, 5), (3,), r"number of items \(3\) must be a positive multiple of batch_size 2"),
    ((0, 2, 3, 5), (0,), "positive multiple"),
])
def test_hand_in_errors(data_shape, label_shape, message):
    with pytest.raises(ValueError, match=message):
        make(batch=2).set_input_arrays(np.zeros(data_shape, np.float32),
                                       np.zeros(label_shape, np.float32))


def test_build_errors():
    with pytest.raises(sc.NetBuildError, match=r"batch_size, channels, height and width must all "
                                               r"be given and > 0 \(got channels 0\)"):
        sc.Net('layer { name: "m" type: "MemoryData" top: "d" top: "l" '
               'memory_data_param { batch_size: 2 height: 3 width: 5 } }')


def test_which_layer_receives_the_arrays():
    second = (NET.format(batch=1, transform="").replace('name: "mem"\n', "")
              .replace('"mem"', '"mem2"').replace('"data"', '"d2"').replace('"label"', '"l2"'))
    two = sc.Net(NET.format(batch=2, transform="") + second)
    data, labels = arrays(2)
    with pytest.raises(sc.NetBuildError, match="2 MemoryData layers.*name one with layer="):
        two.set_input_arrays(data, labels)
    two.set_input_arrays(data, labels, layer="mem2")
    with pytest.raises(sc.NetBuildError, match="no MemoryData layer named 'nope'"):
        two.set_input_arrays(data, labels, layer="nope")
    with pytest.raises(sc.NetBuildError, match="needs a MemoryData layer"):
        sc.Net('input: "x" input_shape { dim: 1 } layer { name: "r" type: "ReLU" bottom: "x" '
               'top: "y" }').set_input_arrays(data, labels)


def test_feeds_a_training_step():
    text = NET.format(batch=2, transform="") + '''
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }'''
    net = sc.Net(text, phase="train")
    data, labels = arrays(4)
    net.set_input_arrays(data, labels % 4)
    loss = net.loss(net.forward())
    loss.backward()
    assert net.params["ip"][0].grad.abs().sum() > 0
