"""Partial weights are reported: the net layers a .caffemodel does not set (they keep their
fillers) are named by the API's warning and WeightsReport, and by run, convert, test and train;
a file cut at a layer boundary (valid protobuf, fewer layers) says it looks cut short."""
import logging

import numpy as np
import pytest

import segaware_caffe as sc
from segaware_caffe.converters import caffemodel as cm
from segaware_caffe.solver import Solver
from segaware_caffe.tools.cli import main
from segaware_caffe.caffe_proto.errors import CaffeFormatError

NET = """name: "three"
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 3 } }
layer { name: "relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "fc2" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 3 } }
layer { name: "fc3" type: "InnerProduct" bottom: "b" top: "c" inner_product_param { num_output: 2 } }
"""


def cut_file(tmp_path, keep):
    """The net's caffemodel with only its first `keep` layers (a cut at a layer boundary)."""
    proto = sc.Net(NET).to_weights_proto()
    del proto.layer[keep:]
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(proto.SerializeToString())
    return path


def test_a_cut_file_warns_naming_the_missing_layers(tmp_path):
    path = cut_file(tmp_path, 2)
    with pytest.warns(UserWarning) as caught:
        net = sc.Net(NET, weights=str(path))
    (message,) = [str(w.message) for w in caught]
    assert message == (f"{path}: loaded 1 layer(s); partial weights: 2 net layer(s) with "
                       f"parameters are not in the weights file and kept their filler values "
                       f"(the file ends after layer 'relu', the net goes on: is it cut short?): "
                       f"fc2, fc3")
    report = net.load_weights(str(path))
    assert report.partial and report.not_in_weights == ["fc2", "fc3"] and report.ends_at == "relu"


def test_a_file_of_another_net_is_partial_but_not_cut(tmp_path):
    proto = sc.Net(NET).to_weights_proto()
    del proto.layer[0]             # fc1 missing at the front: not a cut
    report = sc.Net(NET).load_weights(proto)
    assert report.not_in_weights == ["fc1"] and report.ends_at is None
    assert "cut short" not in str(report)


def test_a_layer_name_that_is_not_utf8_is_a_format_error(tmp_path):
    proto = sc.Net(NET).to_weights_proto()
    path = tmp_path / "w.caffemodel"
    path.write_bytes(proto.SerializeToString().replace(b"fc3", b"f\xff3"))
    with pytest.raises(CaffeFormatError, match=r"w\.caffemodel: layer 3 \(InnerProduct\): field "
                                               r"'name' is not valid UTF-8 text"):
        sc.Net(NET).load_weights(str(path))


def test_the_converters_warn(tmp_path):
    path = cut_file(tmp_path, 3)
    (tmp_path / "net.prototxt").write_text(NET)
    with pytest.warns(UserWarning, match=r"partial weights: 1 net layer\(s\) .*: fc3; the "
                                         r"converted file holds only the blobs the weights file has"):
        cm.convert_caffemodel(tmp_path / "net.prototxt", path, tmp_path / "out.safetensors")


@pytest.mark.parametrize("verb", ["run", "convert", "test", "inspect"])
def test_the_command_line_says_which_layers(tmp_path, capsys, verb):
    path = cut_file(tmp_path, 3)
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    argv = {"run": ["run", str(net), "--weights", str(path), "--input", f"x={tmp_path / 'x.npy'}"],
            "convert": ["convert", str(net), str(path), "-o", str(tmp_path / "o.safetensors")],
            "test": ["test", "--model", str(net), "--weights", str(path), "--iterations", "1",
                     "--input", f"x={tmp_path / 'x.npy'}"],
            "inspect": ["inspect", str(net), "--weights", str(path)]}[verb]
    assert main(argv) == 0
    out = capsys.readouterr()
    text = out.err + out.out
    assert "partial weights: 1 net layer(s) with parameters are not in the weights file" in text
    assert "fc3" in text


def test_the_solver_logs_the_layers_a_weights_file_lacks(tmp_path, caplog):
    path = cut_file(tmp_path, 3)
    (tmp_path / "net.prototxt").write_text(NET.replace(
        'input: "x" input_shape { dim: 2 dim: 3 }',
        'layer { name: "d" type: "DummyData" top: "x" top: "y" dummy_data_param { '
        'shape { dim: 2 dim: 3 } shape { dim: 2 dim: 2 } } }')
        + 'layer { name: "loss" type: "EuclideanLoss" bottom: "c" bottom: "y" top: "loss" }\n')
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\n'
                                              f'lr_policy: "fixed"\nsolver_mode: CPU\n')
    with caplog.at_level(logging.INFO, logger="segaware_caffe.solver"):
        Solver(tmp_path / "solver.prototxt", weights=str(path))
    # fine-tuning from a file of the first layers is the common case: one line after all files
    # names the layers left at their fillers (fc3 has no weight_filler: it also starts at zero)
    lines = [r.getMessage() for r in caplog.records if "filler" in r.getMessage()]
    assert lines[0] == ("1 layer(s) with parameters are not in the weights file(s) and start "
                        "from their fillers: fc3 (no weight_filler: Caffe's default, constant 0)")
    assert lines[1].startswith("1 layer(s) start with ALL-ZERO weights") and len(lines) == 2
