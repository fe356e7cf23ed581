"""`segaware-caffe inspect`: the layer table, its totals, templates and fallbacks."""
import re

import numpy as np

from segaware_caffe.caffe_proto import write_weights
from segaware_caffe.tools.cli import main

TEMPLATE = """name: "tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: ${SIZE} dim: ${SIZE} }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: ${LR} decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "drop" type: "Dropout" bottom: "conv" top: "conv" include { phase: TRAIN } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 5 } }
"""


def _run(capsys, *argv):
    code = main(["inspect", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_table_with_shapes_multipliers_and_totals(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text(TEMPLATE)
    code, out, _ = _run(capsys, str(net), "--set", "SIZE=8", "--set", "LR=3")
    assert code == 0
    assert re.search(r"conv\s+Convolution\s+data\[1x3x8x8\] -> conv\[1x4x8x8\]\s+4x3x3x3, 4\s+"
                     r"3/1, 2/0\s+all", out)
    assert re.search(r"ip\s+InnerProduct\s+conv\[1x4x8x8\] -> ip\[1x5\]\s+5x256, 5\s+1/1, 1/1", out)
    assert "drop" not in out  # TRAIN-only layer, TEST phase
    assert "total: 3 layers, 4 learnable blobs, 1,397 parameters" in out
    code, out, _ = _run(capsys, str(net), "--set", "SIZE=8", "--set", "LR=3", "--phase", "train")
    assert re.search(r"drop\s+Dropout .* TRAIN", out)
    assert "total: 4 layers" in out


def test_variables_file_weights_and_fallback(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text(TEMPLATE.replace('name: "tiny"', 'name: "tiny"\nlayer { name: "odd" '
                                    'type: "NoSuchType" bottom: "data" top: "odd" }'))
    variables = tmp_path / "vars.sh"
    variables.write_text("export SIZE=8\nLR=1\n")
    weights = tmp_path / "w.caffemodel"
    write_weights({"conv": [np.zeros((4, 3, 3, 3)), np.zeros(4)], "ip": [np.zeros((5, 256)),
                                                                         np.zeros(5)]}, weights)
    code, out, _ = _run(capsys, str(net), "--vars", str(variables), "--weights", str(weights))
    assert code == 0
    assert re.search(r"conv\s+Convolution\s+data -> conv\s+4x3x3x3, 4\s+1/1, 2/0", out)
    assert "note: shapes from the prototxt/weights only: NetBuildError: odd (NoSuchType)" in out
    assert "total: 4 layers, 4 learnable blobs, 1,397 parameters" in out


def test_golden_net_with_its_weights(golden, capsys):
    case = golden / "nets" / "embs_deploy"
    code, out, _ = _run(capsys, str(case / "net.prototxt"), "--weights",
                        str(case / "weights.caffemodel"))
    assert code == 0
    assert re.search(r"image_data\s+Input\s+- -> image_data\[1x4x65x65\]", out)
    assert re.search(r"total: \d+ layers, \d+ learnable blobs, [\d,]+ parameters", out)


def test_errors_exit_1_with_the_message(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text(TEMPLATE)
    code, _, err = _run(capsys, str(net), "--set", "SIZE=8")
    assert code == 1
    assert "1 template variable not set: ${LR} (line 5)" in err
    code, _, err = _run(capsys, str(net), "--set", "SIZE")
    assert code == 1 and "--set must look like NAME=VALUE, got 'SIZE'" in err
