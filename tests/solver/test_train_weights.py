"""`train --weights a,b` loads several files in order (a later file's layers win, as in caffe),
`--rename` maps a file's layer names, and the log names the layers each file set, the layers left
at their fillers and, as a warning, those that start with all-zero weights."""
import logging
import re

import numpy as np
import pytest

from segaware_caffe import caffe_proto
from segaware_caffe.filler_report import layers_at_fillers
from segaware_caffe.solver import Solver
from segaware_caffe.tools.cli import main
from segaware_caffe.weights import WeightsFile, renamed

NET = """
name: "three"
input: "x" input_shape { dim: 2 dim: 3 }
input: "y" input_shape { dim: 2 dim: 2 }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "ha"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "b" type: "InnerProduct" bottom: "ha" top: "hb"
  inner_product_param { num_output: 3 } }
layer { name: "c" type: "InnerProduct" bottom: "hb" top: "out" param { lr_mult: 0 } param { lr_mult: 0 }
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 0 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


def weights_file(path, layers):
    """A .caffemodel with InnerProduct layers {name: (weight value, shape, bias shape)}."""
    net = caffe_proto.caffe_pb2.NetParameter(name="w")
    for name, (value, shape, bias) in layers.items():
        layer = net.layer.add(name=name, type="InnerProduct")
        layer.blobs.add().CopyFrom(caffe_proto.array_to_blob(np.full(shape, value, np.float32)))
        layer.blobs.add().CopyFrom(caffe_proto.array_to_blob(np.full(bias, value, np.float32)))
    caffe_proto.write_weights(net, path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 1 '
        f'snapshot_prefix: "{tmp_path}/snap" solver_mode: CPU random_seed: 1')
    first = weights_file(tmp_path / "first.caffemodel", {"a": (1.0, (3, 3), (3,)), "b": (1.0, (3, 3), (3,))})
    second = weights_file(tmp_path / "second.caffemodel", {"b": (2.0, (3, 3), (3,)),
                                                           "elsewhere": (5.0, (1, 1), (1,))})
    embs = weights_file(tmp_path / "embs.caffemodel", {"conv_a": (3.0, (3, 3), (3,)),
                                                       "conv_b": (4.0, (3, 3), (3,))})
    return tmp_path, first, second, embs


def test_files_load_in_order_and_the_fillers_are_reported(files, caplog):
    tmp_path, first, second, _ = files
    with caplog.at_level(logging.INFO, logger="segaware_caffe"):
        solver = Solver(tmp_path / "solver.prototxt", weights=[first, second])
    params = solver.net.params
    assert float(params["a"][0][0, 0].detach()) == 1.0 and float(params["b"][0][0, 0].detach()) == 2.0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"Copied 2 layer(s) from {first}: a, b" in text
    assert f"Copied 1 layer(s) from {second}: b" in text
    assert "Ignoring source layer elsewhere" in text
    assert ("1 layer(s) with parameters are not in the weights file(s) and start from their "
            "fillers: c (weight_filler constant 0)") in text
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert re.search(r"1 layer\(s\) start with ALL-ZERO weights.*: c \(weight_filler constant 0\); "
                     r"c have lr_mult 0 and stay zero", warning.getMessage())
    assert [layer.name for layer in solver.filler_layers] == ["c"]


def test_from_scratch_every_zero_weight_layer_is_named(files, caplog):
    tmp_path, *_ = files
    with caplog.at_level(logging.INFO, logger="segaware_caffe"):
        solver = Solver(tmp_path / "solver.prototxt")
    layers = {layer.name: layer for layer in layers_at_fillers(solver.net)}
    assert set(layers) == {"a", "b", "c"}
    assert not layers["a"].zero and layers["b"].zero and layers["c"].zero and layers["c"].frozen
    assert layers["b"].filler == "no weight_filler: Caffe's default, constant 0"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "2 layer(s) start with ALL-ZERO weights" in warning[0]
    assert "b (no weight_filler: Caffe's default, constant 0); c (weight_filler constant 0)" in warning[0]
    assert "give them a weight_filler or start from a weights file" in warning[0]


def test_renamed_layers_land_under_their_new_names(files):
    tmp_path, _, _, embs = files
    weights = renamed(embs, [(r"conv_(.*)", r"\1")])
    assert [layer.name for layer in weights.layers] == ["a", "b"] and weights.where == embs
    solver = Solver(tmp_path / "solver.prototxt", weights=weights)
    assert float(solver.net.params["a"][0][0, 0].detach()) == 3.0 and float(solver.net.params["b"][0][0, 0].detach()) == 4.0
    assert [layer.name for layer in renamed(embs, [("conv_a", "x"), ("conv_.*", "y")]).layers] == ["x", "y"]
    with pytest.raises(Exception, match="gives an empty name"):
        renamed(WeightsFile(embs), [("conv_a", "")])


def test_cli_loads_comma_separated_files_in_order_with_renames(files, capsys):
    tmp_path, first, second, embs = files
    code = main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--iterations", "0",
                 "--weights", f"{first},{embs}", "--rename", r"conv_(a)=\1", "--weights", second])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"Copied 1 layer(s) from {embs}: a" in err and "Ignoring source layer conv_b" in err
    snapshot = caffe_proto.weights_to_arrays(caffe_proto.read_weights(tmp_path / "snap_iter_0.caffemodel"))
    assert snapshot["a"][0][0, 0] == 3.0      # embs (renamed) came after first
    assert snapshot["b"][0][0, 0] == 2.0      # second came last
    assert re.search(r"W\d{4} .*ALL-ZERO weights", err)


def test_cli_rename_errors(files, capsys):
    tmp_path, first, *_ = files
    solver = str(tmp_path / "solver.prototxt")
    with pytest.raises(SystemExit):
        main(["train", "--solver", solver, "--rename", "a=b", "--weights", first])
    assert "--rename a=b: give it after the --weights file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--solver", solver, "--weights", first, "--rename", "nothing"])
    assert "--rename expects FROM=TO" in capsys.readouterr().err
    assert main(["train", "--solver", solver, "--weights", first, "--rename", "(=x"]) == 1
    assert "--rename '(': not a regular expression" in capsys.readouterr().err
