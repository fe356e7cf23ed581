"""The weights codec (segaware_caffe.weights): Caffe's matching of .caffemodel layers to a net's,
shared by Net.load_weights, the converters and the Solver, and each file parsed once."""
import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import caffe_proto
from segaware_caffe.converters import caffemodel as cm
from segaware_caffe.weights import WeightsFile, match_weights
from tests.net.toy_net import NET

TWO_IP = """
name: "t"
input: "x" input_shape { dim: 1 dim: 2 }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 2 } }
layer { name: "other" type: "InnerProduct" bottom: "b" top: "c" inner_product_param { num_output: 2 } }
"""


def weights_file(*layers):
    """A caffemodel NetParameter with (name, [arrays]) layers, in order."""
    net = caffe_proto.caffe_pb2.NetParameter()
    for name, arrays in layers:
        layer = net.layer.add(name=name)
        layer.blobs.extend(caffe_proto.array_to_blob(np.asarray(a, np.float32)) for a in arrays)
    return net


def test_later_file_layers_of_a_name_win_and_partial_weights_are_reported():
    net = sc.Net(TWO_IP)
    source = weights_file(("ip", [np.full((2, 2), 1.0), np.zeros(2)]),
                          ("ghost", [np.zeros(3)]),
                          ("ip", [np.full((2, 2), 4.0), np.ones(2)]))
    report = net.load_weights(source)
    first, second = (r.module for r in net.records if r.name == "ip")
    assert torch.equal(first.weight, torch.full((2, 2), 4.0)) and torch.equal(first.bias, torch.ones(2))
    assert not torch.equal(second.weight, torch.full((2, 2), 4.0))
    assert report.loaded == ["ip"] and report.not_in_net == ["ghost"]
    assert report.not_in_weights == ["ip", "other"] and report.partial
    assert "2 net layer(s) with parameters are not in the weights file" in str(report)
    assert "other" in str(report)


def test_converters_take_the_same_blobs_as_the_net():
    net = sc.Net(TWO_IP)
    source = weights_file(("ip", [np.full((2, 2), 1.0), np.zeros(2)]),
                          ("ip", [np.full((2, 2), 4.0), np.ones(2)]),
                          ("other", [np.eye(2), np.zeros(2)]))
    tensors, metadata, ignored = cm.caffemodel_to_tensors(net, source)
    net.load_weights(source)
    state = {k[len("layers."):]: v for k, v in net.state_dict().items()}
    assert set(tensors) == {"ip.weight", "ip.bias", "other.weight", "other.bias"}
    for name, tensor in tensors.items():
        assert torch.equal(tensor, state[name]), name
    assert [layer["name"] for layer in metadata["layers"]] == ["ip", "other"] and ignored == []


@pytest.mark.parametrize("layers, message", [
    ([("ip", [np.zeros((2, 2))])], r"layer ip \(InnerProduct\) has 1 blob\(s\) in the weights "
                                   r"file, the net expects 2 \(weight, bias\)"),
    ([("ip", [])], r"layer ip \(InnerProduct\) has 0 blob\(s\)"),   # Caffe checks blobless ones too
    ([("ip", [np.zeros((2, 3)), np.zeros(2)])],
     r"layer ip \(InnerProduct\) blob 0 \(weight\) has shape \(2, 3\) in the weights file, the "
     r"net expects \(2, 2\)"),
])
def test_mismatches_name_the_file_layer_and_blob(layers, message):
    net = sc.Net(TWO_IP)
    with pytest.raises(sc.NetBuildError, match=message):
        net.load_weights(weights_file(*layers))
    with pytest.raises(sc.NetBuildError, match=message):
        cm.caffemodel_to_tensors(net, weights_file(*layers))


def test_legacy_4d_blobs_fit_right_aligned():
    net = sc.Net(TWO_IP)
    source = weights_file(("ip", [np.zeros((2, 2)), np.arange(2.0)]))
    bias = source.layer[0].blobs[1]
    bias.ClearField("shape")
    bias.num, bias.channels, bias.height, bias.width = 1, 1, 1, 2
    net.load_weights(source)
    assert net.params["ip"][1].tolist() == [0.0, 1.0]
    bias.num, bias.channels, bias.height, bias.width = 1, 1, 2, 1
    with pytest.raises(sc.NetBuildError, match=r"blob 1 \(bias\) has shape \(1, 1, 2, 1\)"):
        net.load_weights(source)


def test_a_weights_file_is_read_and_decoded_once(tmp_path, monkeypatch):
    path = tmp_path / "w.caffemodel"
    sc.Net(TWO_IP).save_weights(path)
    reads, decodes = [], []
    real_read, real_decode = caffe_proto.read_weights, caffe_proto.blob_to_array
    monkeypatch.setattr(caffe_proto, "read_weights", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    monkeypatch.setattr(caffe_proto, "blob_to_array",
                        lambda *a, **k: decodes.append(a) or real_decode(*a, **k))
    weights = WeightsFile(path)
    for _ in range(3):
        sc.Net(TWO_IP).load_weights(weights)
    # the file repeats "ip": only the blobs that end up in the net (the later "ip", "other")
    assert len(reads) == 1 and len(decodes) == 4
    match = match_weights(sc.Net(TWO_IP), weights)
    assert list(match.layers) == ["ip", "other"]


def test_the_solver_reads_its_weights_once_for_all_its_nets(tmp_path, monkeypatch):
    from segaware_caffe.solver import Solver
    from tests.solver.toy_layers import TOY_NET
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" test_iter: 1 test_iter: 1 test_interval: 10 lr_policy: "fixed"')
    Solver(tmp_path / "solver.prototxt").net.save_weights(tmp_path / "init.caffemodel")
    reads = []
    real_read = caffe_proto.read_weights
    monkeypatch.setattr(caffe_proto, "read_weights", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    solver = Solver(tmp_path / "solver.prototxt", weights=tmp_path / "init.caffemodel")
    assert len(solver.test_nets) == 2 and len(reads) == 1


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
