"""A training loss or gradient that becomes NaN/inf stops the run (or warns once, or is not
checked), naming the iteration and the first layer whose output or diff went non-finite; weights
files with NaN/inf warn with the layer and blob."""
import logging
import warnings

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.errors import NonFiniteError, NonFiniteWarning, SolverError
from segaware_caffe.nonfinite import all_finite, describe_values
from segaware_caffe.solver import Solver
from segaware_caffe.tools.cli import main

NET = """name: "two_fc"
input: "x" input_shape { dim: 4 dim: 3 }
input: "y" input_shape { dim: 4 dim: 2 }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 3 weight_filler { type: "constant" value: 0.5 } } }
layer { name: "fc2" type: "InnerProduct" bottom: "h" top: "out"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""

# sqrt at 0: the forward is finite, its derivative is not
SQRT_NET = """name: "sqrt"
input: "x" input_shape { dim: 2 dim: 3 }
input: "y" input_shape { dim: 2 dim: 2 }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { num_output: 2 } }
layer { name: "root" type: "Power" bottom: "h" top: "r" power_param { power: 0.5 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "r" bottom: "y" top: "loss" }
"""

# dropout between the layers: the replay must draw the same mask
DROPOUT_NET = """name: "drop"
input: "x" input_shape { dim: 4 dim: 3 }
input: "y" input_shape { dim: 4 dim: 3 }
layer { name: "drop" type: "Dropout" bottom: "x" top: "d" dropout_param { dropout_ratio: 0.5 } }
layer { name: "log" type: "Log" bottom: "d" top: "l" }
layer { name: "fc" type: "InnerProduct" bottom: "l" top: "out" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


def solver(tmp_path, net, base_lr=0.01, **kwargs):
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: {base_lr}\nlr_policy: "fixed"\n'
        f'max_iter: 10\nsolver_mode: CPU\nrandom_seed: 3\n')
    return Solver(tmp_path / "solver.prototxt", **kwargs)


def feed(rows=4, x_cols=3, y_cols=2, x=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, x_cols)).astype(np.float32) if x is None else x
    return {"x": x, "y": rng.normal(size=(rows, y_cols)).astype(np.float32)}


def test_all_finite_and_the_description():
    assert all_finite([torch.ones(3), None, torch.arange(3)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    huge = torch.full((4,), 3e38)        # finite, but its sum overflows float32
    assert all_finite([huge])
    assert describe_values(torch.tensor([float("nan"), float("inf"), 1.0, -float("inf")])) == \
        "1 NaN and 2 infinite of 4 values"


def test_a_diverging_run_stops_naming_the_iteration_and_the_first_layer(tmp_path):
    s = solver(tmp_path, NET, base_lr=1e30)
    with pytest.raises(NonFiniteError) as info:
        s.step(5, inputs=feed())
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'solver.prototxt'}: iteration 1: the loss is ")
    assert ("the first layer (in net order) whose output is not finite is fc2 (InnerProduct): "
            "top 'out' holds") in message
    assert "its bottoms are finite" in message and "--nonfinite warn" in message
    assert s.iter == 1        # iteration 1 was not applied


def test_a_non_finite_gradient_names_the_layer_whose_backward_made_it(tmp_path):
    s = solver(tmp_path, SQRT_NET)
    with pytest.raises(NonFiniteError) as info:
        s.step(1, inputs=feed(rows=2, y_cols=2, x=np.zeros((2, 3), np.float32)))
    message = str(info.value)
    assert "iteration 0: a gradient is not finite; every output is finite; the first diff (in " \
           "backward order) that is not is that of top 'h' of fc (InnerProduct), computed by " \
           "the backward of root (Power): 4 NaN of 4 values" in message
    # the replay put the diffs and values back as they were
    assert all(p.grad is None or not all_finite([p.grad]) for p in s.net.learnable_params)


def test_warn_goes_on_and_says_it_once(tmp_path, caplog):
    s = solver(tmp_path, NET, base_lr=1e30, nonfinite="warn")
    with caplog.at_level(logging.WARNING, logger="segaware_caffe.solver"):
        s.step(4, inputs=feed())
    assert s.iter == 4
    said = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(said) == 1 and "iteration 1" in said[0] and "going on" in said[0]


def test_ignore_does_not_check(tmp_path):
    s = solver(tmp_path, NET, base_lr=1e30, nonfinite="ignore")
    s.step(4, inputs=feed())
    assert s.iter == 4 and not all_finite([p.data for p in s.net.learnable_params])
    with pytest.raises(SolverError, match="nonfinite must be one of stop, warn, ignore, got 'x'"):
        solver(tmp_path, NET, nonfinite="x")


def test_the_replay_draws_the_same_dropout_mask(tmp_path):
    # log of the inputs: negative ones give NaN, but dropout zeroes half of them (log 0 = -inf)
    s = solver(tmp_path, DROPOUT_NET)
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=r"iteration 0: the loss is nan; the first layer \(in "
                                             r"net order\) whose output is not finite is log "
                                             r"\(Log\): top 'l' holds"):
        s.step(1, inputs=feed(y_cols=3))


def test_cli_train_stops_with_one_line(tmp_path, capsys):
    s = solver(tmp_path, NET, base_lr=1e30)   # writes the files
    del s
    np.save(tmp_path / "x.npy", feed()["x"])
    data_net = NET.replace('input: "x" input_shape { dim: 4 dim: 3 }\ninput: "y" input_shape '
                           '{ dim: 4 dim: 2 }\n',
                           'layer { name: "data" type: "DummyData" top: "x" top: "y" '
                           'dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } '
                           'data_filler { type: "gaussian" } } }\n')
    (tmp_path / "net.prototxt").write_text(data_net)
    status = main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--iterations", "3"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("segaware-caffe train: error: ") and "iteration 1: the loss is" in last
    status = main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--iterations", "3",
                   "--nonfinite", "warn"])
    assert status == 0 and "going on" in capsys.readouterr().err


def test_weights_with_nan_warn_naming_layer_and_blob(tmp_path):
    net = sc.Net(NET)
    weights = net.to_weights_proto()
    weights.layer[1].blobs[0].data[4] = float("nan")
    weights.layer[1].blobs[0].data[5] = float("inf")
    path = tmp_path / "w.caffemodel"
    path.write_bytes(weights.SerializeToString())
    with pytest.warns(NonFiniteWarning, match=rf"{path}: layer 'fc2' blob 0 \(shape \(2, 3\)\) "
                                              r"holds 1 NaN and 1 infinite value\(s\) of 6 \(the "
                                              r"first at index \(1, 1\)\)"):
        sc.Net(NET, weights=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sc.Net(NET, weights=net.to_weights_proto())    # finite weights: no word
