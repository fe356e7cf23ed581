"""Snapshots: names, contents, exact resume, atomic writes; and the solver's one-line errors."""
import os

import numpy as np
import pytest
import torch

from segaware_caffe import caffe_proto
import segaware_caffe.solver as solver_module
from segaware_caffe.solver import Solver
from tests.solver.test_solver_rules import batches, make_solver
from tests.solver.toy_layers import TOY_NET

SGD = 'type: "SGD" base_lr: 0.1 lr_policy: "multistep" gamma: 0.5 stepvalue: 1 stepvalue: 3 ' \
      'momentum: 0.9 weight_decay: 0.01 snapshot_prefix: "{prefix}"'
ADAM = 'type: "Adam" base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 snapshot_prefix: "{prefix}"'


@pytest.mark.parametrize("body", [SGD, ADAM], ids=["sgd_multistep", "adam"])
def test_resume_reproduces_continuous_run(tmp_path, body):
    body = body.format(prefix=tmp_path / "snap")
    feeds = batches(4)
    continuous = make_solver(tmp_path, body)
    continuous.step(2, inputs=lambda it: feeds[it])
    model_file, state_file = continuous.snapshot()
    assert (model_file, state_file) == (f"{tmp_path}/snap_iter_2.caffemodel",
                                        f"{tmp_path}/snap_iter_2.solverstate")
    continuous.step(2, inputs=lambda it: feeds[it])

    resumed = make_solver(tmp_path, body)
    resumed.restore(state_file)
    assert (resumed.iter, resumed.current_step) == (2, 1 if "multistep" in body else 0)
    resumed.step(2, inputs=lambda it: feeds[it])
    for a, b in zip(continuous.net.learnable_params, resumed.net.learnable_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(continuous.history, resumed.history):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_solve_snapshots_on_schedule_and_after_training(tmp_path):
    body = f'type: "SGD" base_lr: 0.1 lr_policy: "fixed" max_iter: 5 snapshot: 2 ' \
           f'snapshot_prefix: "{tmp_path}/out/toy"'
    (tmp_path / "out").mkdir()
    solver = make_solver(tmp_path, body)
    feeds = batches(6)
    with pytest.raises(ValueError, match="the train net has inputs x, y"):
        solver.solve()
    solver.solve(inputs=lambda it: feeds[it])
    assert solver.iter == 5
    assert sorted(os.listdir(tmp_path / "out")) == [
        f"toy_iter_{i}.{ext}" for i in (2, 4, 5) for ext in ("caffemodel", "solverstate")]
    state = caffe_proto.read_solverstate(tmp_path / "out" / "toy_iter_4.solverstate")
    assert state.iter == 4 and state.learned_net == f"{tmp_path}/out/toy_iter_4.caffemodel"
    assert len(state.history) == 4


def test_failed_snapshot_leaves_previous_files_intact(tmp_path, monkeypatch):
    solver = make_solver(tmp_path, SGD.format(prefix=tmp_path / "snap"))
    solver.step(2, inputs=batches(1)[0])
    model_file, state_file = solver.snapshot()
    before = {f: open(f, "rb").read() for f in (model_file, state_file)}
    with torch.no_grad():
        solver.net.learnable_params[0].add_(1.0)      # new weights, same iteration: same names

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(solver_module.os, "fsync", disk_full)   # fails after bytes were written
    with pytest.raises(OSError, match="No space left"):
        solver.snapshot()
    for f, data in before.items():
        assert open(f, "rb").read() == data, f"{f} was modified by the failed snapshot"
    assert sorted(os.listdir(tmp_path)) == ["net.prototxt", "snap_iter_2.caffemodel",
                                            "snap_iter_2.solverstate", "solver.prototxt"]
    monkeypatch.undo()
    resumed = make_solver(tmp_path, SGD.format(prefix=tmp_path / "snap"))
    resumed.restore(state_file)                        # the previous snapshot still loads
    assert resumed.iter == 2


def test_snapshot_diff_writes_update_values(tmp_path):
    solver = make_solver(tmp_path, SGD.format(prefix=tmp_path / "snap") + " snapshot_diff: true")
    solver.step(1, inputs=batches(1)[0])
    model_file, _ = solver.snapshot()
    net = caffe_proto.read_weights(model_file)
    fc = next(layer for layer in net.layer if layer.name == "fc")
    np.testing.assert_array_equal(np.asarray(fc.blobs[0].diff, dtype=np.float32),
                                  solver.history[0].numpy().ravel())   # SGD: diff = momentum buffer


# ---------------------------------------------------------------------------------------- errors
def one_line_error(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("body, pattern", [
    ('base_lr: 0.1 lr_policy: "fixed"', r"no train net: set one of net, net_param, train_net"),
    ('net: "net.prototxt" train_net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed"',
     r"more than one train net given \(net, train_net\)"),
    ('net: "missing.prototxt" base_lr: 0.1 lr_policy: "fixed"', r"net: net file 'missing.prototxt' not found"),
    ('net: "net.prototxt" type: "Adamax" lr_policy: "fixed"',
     r"unknown solver type 'Adamax' \(known types: AdaDelta, AdaGrad, Adam, Nesterov, RMSProp, SGD\)"),
    ('net: "net.prototxt" lr_policy: "cosine"', r"unknown lr_policy 'cosine' \(one of fixed, step"),
    ('net: "net.prototxt"', r"lr_policy is not set"),
    ('net: "net.prototxt" lr_policy: "step"', r"lr_policy \"step\" needs stepsize > 0, got 0"),
    ('net: "net.prototxt" lr_policy: "fixed" type: "AdaGrad" momentum: 0.9',
     r"momentum cannot be used with AdaGrad"),
    ('net: "net.prototxt" lr_policy: "fixed" regularization_type: "L3"', r"unknown regularization_type 'L3'"),
    ('net: "net.prototxt" lr_policy: "fixed" test_iter: 2', r"test_iter must be given for each test net|test_interval is 0"),
    ('net: "net.prototxt" lr_policy: "fixed" snapshot: 10 snapshot_prefix: "/nonexistent/dir/x"',
     r"cannot write snapshots with snapshot_prefix '/nonexistent/dir/x'"),
    ('net: "net.prototxt" lr_policy: "fixed" base_lr: ${LR}', r"template variable not set: \$\{LR\}"),
])
def test_bad_solver_files(tmp_path, body, pattern):
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text(body)
    with pytest.raises(ValueError, match=pattern) as exc_info:
        Solver(tmp_path / "solver.prototxt")
    assert one_line_error(exc_info).startswith(str(tmp_path / "solver.prototxt"))


def test_restore_history_count_mismatch(tmp_path):
    sgd = make_solver(tmp_path, SGD.format(prefix=tmp_path / "snap"))
    sgd.step(1, inputs=batches(1)[0])
    _, state_file = sgd.snapshot()
    adam = make_solver(tmp_path, ADAM.format(prefix=tmp_path / "snap"))
    with pytest.raises(ValueError, match=r"holds 4 history blobs, but the Adam solver of net 'toy' "
                                         r"keeps 8 \(2 x 4 learnable blobs\)") as exc_info:
        adam.restore(state_file)
    one_line_error(exc_info)
    assert adam.iter == 0


def test_restore_history_shape_mismatch(tmp_path):
    sgd = make_solver(tmp_path, SGD.format(prefix=tmp_path / "snap"))
    sgd.step(1, inputs=batches(1)[0])
    _, state_file = sgd.snapshot()
    other = tmp_path / "other"
    other.mkdir()
    (other / "net.prototxt").write_text(TOY_NET.replace("dim: 4 dim: 3", "dim: 4 dim: 5"))
    (other / "solver.prototxt").write_text('net: "net.prototxt" lr_policy: "fixed" solver_mode: CPU')
    solver = Solver(other / "solver.prototxt")
    with pytest.raises(ValueError, match=r"history blob 0 \(fc blob 0\) has shape \(2, 3\), the "
                                         r"net's blob has \(2, 5\)") as exc_info:
        solver.restore(state_file)
    one_line_error(exc_info)


def test_restore_missing_learned_net(tmp_path):
    solver = make_solver(tmp_path, SGD.format(prefix=tmp_path / "snap"))
    _, state_file = solver.snapshot()
    os.remove(tmp_path / "snap_iter_0.caffemodel")
    with pytest.raises(ValueError, match=r"learned_net '.*snap_iter_0.caffemodel' not found"):
        solver.restore(state_file)


def test_step_without_inputs_for_input_net(tmp_path):
    solver = make_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed"')
    with pytest.raises(ValueError, match=r"the train net has inputs x, y: pass step\(\.\.\., inputs="):
        solver.step(1)


def test_hdf5_snapshots_are_unsupported_errors(tmp_path):
    from segaware_caffe.errors import UnsupportedError
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" lr_policy: "fixed" '
                                              'snapshot_format: HDF5')
    with pytest.raises(UnsupportedError, match=r"solver.prototxt: snapshot_format HDF5 is not "
                                               r"supported \(h5py-free build\); use BINARYPROTO"):
        Solver(tmp_path / "solver.prototxt")
    solver = make_solver(tmp_path, SGD.format(prefix=tmp_path / "snap"))
    with pytest.raises(UnsupportedError, match=r"snap_iter_1.solverstate.h5: HDF5 solver states "
                                               r"are not supported"):
        solver.restore(tmp_path / "snap_iter_1.solverstate.h5")
