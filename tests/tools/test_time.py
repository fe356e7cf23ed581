"""`segaware-caffe time`: the per-layer timer runs the net's own graph, so it honours what
Net.forward does (propagate_down cuts, refused gradients, the element-0 zeroing, Split tops)."""
import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.errors import NoBackwardError
from segaware_caffe.tools.cli import main
from segaware_caffe.tools.cmd_time import LayerTimer
from tests.net.test_loss_weights import LOSS_THEN_READ
from tests.net.toy_net import REFUSING_NET

NET = """
name: "t"
input: "x" input_shape { dim: 2 dim: 3 }
input: "label" input_shape { dim: 2 dim: 3 }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y" PROPAGATE
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "p" type: "Power" bottom: "y" top: "p" }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }
"""


def by_name(timer, table):
    return {r.name: table[id(r)] for r in timer.records}


def test_the_timer_follows_propagate_down_and_the_splits():
    net = sc.Net(NET.replace("PROPAGATE", "propagate_down: false"), phase="train")
    timer = LayerTimer(net, torch.device("cpu"))
    feed = {"x": torch.randn(2, 3), "label": torch.zeros(2, 3)}
    timer.forward_backward(feed)
    backward = by_name(timer, timer.backward_ms)
    assert [r.name for r in timer.records] == ["ip1", "ip2", "y_ip2_0_split", "p", "loss"]
    assert backward["ip1"] == 0.0              # its top is cut: no backward ran
    assert backward["ip2"] > 0 and backward["y_ip2_0_split"] > 0
    forward = by_name(timer, timer.forward_ms)
    assert all(v > 0 for v in forward.values())


def test_the_timer_keeps_the_element_0_zeroing_and_refusals():
    text = REFUSING_NET + 'layer { name: "loss" type: "Power" bottom: "par" top: "loss" loss_weight: 1 }'
    net = sc.Net(text, phase="train")
    timer = LayerTimer(net, torch.device("cpu"))
    with pytest.raises(NoBackwardError, match=r"parity \(Im2parity\) has no backward"):
        timer.forward_backward({"x": torch.ones(4)})
    plain = sc.Net('name: "z" input: "x" input_shape { dim: 3 } '
                   'input: "label" input_shape { dim: 3 }'
                   'layer { name: "p" type: "Power" bottom: "x" top: "p" }')
    timer = LayerTimer(plain, torch.device("cpu"))
    out = timer.run(*plain.feed({"x": torch.ones(3), "label": torch.arange(1.0, 4.0)}))
    assert out["label"].tolist() == [0.0, 2.0, 3.0]    # Net::Forward's zeroing of an output input


def test_time_verb_prints_every_layer(tmp_path, capsys):
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(NET.replace("PROPAGATE", ""))
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    assert main(["time", "--model", str(prototxt), "--iterations", "2",
                 "--input", f"x={tmp_path / 'x.npy'}"]) == 0
    err = capsys.readouterr().err
    for name in ("ip1", "ip2", "y_ip2_0_split", "p", "loss"):
        assert f"{name}\tforward:" in err.replace(" " * 10, "") or f" {name}\tforward:" in err, name
    assert "Average Forward-Backward:" in err


def test_the_layer_timer_runs_a_net_with_a_loss_split():
    from segaware_caffe.tools.cmd_time import LayerTimer
    net = sc.Net(LOSS_THEN_READ, phase="train")
    timer = LayerTimer(net, torch.device("cpu"))
    forward_ms, backward_ms = timer.forward_backward({"data": torch.ones(1, 1, 2, 2)})
    assert forward_ms >= 0 and backward_ms >= 0
