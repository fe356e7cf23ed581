"""`segaware-caffe inspect`: the layer table, its totals, templates and fallbacks."""
import re
import pytest

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
    assert re.search(r"odd\s+NoSuchType \(unsupported\)\s+data -> odd", out)
    assert ("note: 1 layer(s) of type(s) segaware-caffe does not implement: NoSuchType (odd); "
            "register one with @segaware_caffe.register_layer") in out
    assert "note: shapes from the prototxt/weights only: not built: 1 layer(s) of unsupported types" in out
    assert "total: 4 layers, 4 learnable blobs, 1,397 parameters" in out


def test_unsupported_types_are_marked_in_every_listing(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                   'layer { name: "a" type: "Upsample" bottom: "data" top: "a" }\n'
                   'layer { name: "b" type: "ReLU" bottom: "a" top: "b" }\n'
                   'layer { name: "c" type: "Upsample" bottom: "b" top: "c" include { phase: TRAIN } }\n'
                   'layer { name: "d" type: "DetectionOutput2" bottom: "b" top: "d" }\n')
    code, out, _ = _run(capsys, str(net), "--all-phases")
    assert code == 0
    assert re.search(r"a\s+Upsample \(unsupported\)", out) and re.search(r"c\s+Upsample \(unsupported\)", out)
    assert re.search(r"b\s+ReLU\s", out)
    assert "3 layer(s) of type(s) segaware-caffe does not implement: DetectionOutput2 (d), Upsample (a, c)" in out
    code, out, _ = _run(capsys, str(net))            # TEST phase: c is not listed
    assert "2 layer(s) of type(s) segaware-caffe does not implement: DetectionOutput2 (d), Upsample (a)" in out


def test_supported_layer_types_lists_every_type():
    import segaware_caffe as sc
    types = sc.supported_layer_types()
    assert types == sorted(types)
    for kind in ("Input", "Convolution", "Normalize", "Permute", "PriorBox", "DetectionOutput",
                 "Python", "Softmax", "Flatten", "Concat", "Reshape"):
        assert kind in types


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


FLOPS_NET = """
name: "counted"
input: "data" input_shape { dim: 2 dim: 3 dim: 9 dim: 7 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "a" type: "Power" bottom: "fc" top: "a" }
layer { name: "b" type: "Power" bottom: "fc" top: "b" }
"""


def test_flops_and_top_memory_per_layer_and_in_total(tmp_path, capsys):
    (tmp_path / "net.prototxt").write_text(FLOPS_NET)
    assert main(["inspect", str(tmp_path / "net.prototxt")]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    assert header.split()[-3:] == ["FLOPs", "top", "memory"]
    rows = {line.split()[1]: line for line in out.splitlines()[3:8]}
    conv_flops = 2 * (2 * 4 * 9 * 7) * (3 * 3 * 3)          # 2 x outputs x (C x kh x kw)
    fc_flops = 2 * (2 * 5) * (4 * 9 * 7)
    assert rows["conv"].split()[-4:] == [f"{conv_flops / 1e3:.2f}", "k", "2.0", "KiB"]   # 2*4*9*7*4 B
    assert rows["fc"].split()[-4:] == [f"{fc_flops / 1e3:.2f}", "k", "40", "B"]
    assert rows["relu"].split()[-2:] == ["-", "-"]          # in place: no new memory
    total = re.search(r"total: 5 layers.*, ([\d.]+) kFLOPs forward, ([\d.]+) KiB of layer tops", out)
    assert float(total.group(1)) == pytest.approx((conv_flops + fc_flops) / 1e3, abs=0.01)
    # tops: conv 2016 B, fc 40, a 40, b 40 (the Split of fc shares its data)
    assert float(total.group(2)) == pytest.approx((2016 + 120) / 1024, abs=0.05)
    assert "activations of the whole net: 3.6 KiB" in out   # plus the 1512 B input
