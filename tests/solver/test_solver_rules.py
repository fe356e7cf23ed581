"""Solver machinery on a toy net against an independent float64 reference of Caffe's maths
(BVLC fe0f44112's solvers, which the fork did not change): every solver type, lr_mult/decay_mult, L1/L2, iter_size, clipping, policies,
history order, snapshots and restore."""
import math

import numpy as np
import pytest
import torch

from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.solver import Solver
from segaware_caffe.solvers.rules import learning_rate
from tests.solver.toy_layers import TOY_NET
from tests.tolerances import SOLVER_HISTORY_ABSFRAC, assert_close

STEPS = 5


def solver_text(body):
    return 'net: "net.prototxt"\nsolver_mode: CPU\nrandom_seed: 1\n' + body


def make_solver(tmp_path, body, **kwargs):
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text(solver_text(body))
    return Solver(tmp_path / "solver.prototxt", **kwargs)


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(4, 3)).astype(np.float32),
             "y": rng.normal(size=(4, 2)).astype(np.float32)} for _ in range(count)]


def reference_run(param, params, lr_mults, decay_mults, feeds):
    """Caffe's Step/ApplyUpdate in float64 numpy for the toy net (fc trained, frozen unused by the
    loss). params: [W_fc, b_fc, W_frozen, b_frozen]. Returns the params after each step."""
    params = [p.astype(np.float64) for p in params]
    sets = 2 if param.type in ("AdaDelta", "Adam") else 1
    history = [[np.zeros_like(p) for p in params] for _ in range(sets)]
    momentum, delta = param.momentum, param.delta
    trajectory, current_step = [], 0
    for it, feed in enumerate(feeds):
        x, y = feed["x"].astype(np.float64), feed["y"].astype(np.float64)
        residual = (x @ params[0].T + params[1] - y) / x.shape[0]
        grads = [residual.T @ x, residual.sum(0), np.zeros_like(params[2]), np.zeros_like(params[3])]
        grads = [g * param.iter_size for g in grads]                  # summed over the passes
        rate, current_step = learning_rate(param, it, current_step)
        if param.clip_gradients >= 0:
            norm = math.sqrt(sum((g ** 2).sum() for g in grads))
            if norm > param.clip_gradients:
                grads = [g * param.clip_gradients / norm for g in grads]
        for k, (w, g) in enumerate(zip(params, grads)):
            g = g / param.iter_size
            decay = param.weight_decay * decay_mults[k]
            g = g + decay * (w if param.regularization_type == "L2" else np.sign(w))
            lr = rate * lr_mults[k]
            h = [history[s][k] for s in range(sets)]
            if param.type == "SGD":
                h[0][...] = lr * g + momentum * h[0]
                step = h[0]
            elif param.type == "Nesterov":
                old = h[0].copy()
                h[0][...] = lr * g + momentum * h[0]
                step = (1 + momentum) * h[0] - momentum * old
            elif param.type == "AdaGrad":
                h[0] += g ** 2
                step = lr * g / (np.sqrt(h[0]) + delta)
            elif param.type == "RMSProp":
                h[0][...] = param.rms_decay * h[0] + (1 - param.rms_decay) * g ** 2
                step = lr * g / (np.sqrt(h[0]) + delta)
            elif param.type == "AdaDelta":
                h[0][...] = momentum * h[0] + (1 - momentum) * g ** 2
                u = g * np.sqrt((h[1] + delta) / (h[0] + delta))
                h[1][...] = momentum * h[1] + (1 - momentum) * u ** 2
                step = lr * u
            elif param.type == "Adam":
                t = it + 1
                h[0][...] = momentum * h[0] + (1 - momentum) * g
                h[1][...] = param.momentum2 * h[1] + (1 - param.momentum2) * g ** 2
                correction = math.sqrt(1 - param.momentum2 ** t) / (1 - momentum ** t)
                step = lr * correction * h[0] / (np.sqrt(h[1]) + delta)
            params[k] = w - step
        trajectory.append([p.copy() for p in params])
    return trajectory, history


CONFIGS = {
    "sgd_step": 'type: "SGD" base_lr: 0.1 lr_policy: "step" gamma: 0.5 stepsize: 2 momentum: 0.9 '
                'weight_decay: 0.01',
    "sgd_l1_iter_size3": 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.8 '
                         'weight_decay: 0.02 regularization_type: "L1" iter_size: 3',
    "sgd_clip": 'type: "SGD" base_lr: 0.1 lr_policy: "exp" gamma: 0.9 momentum: 0.9 '
                'clip_gradients: 0.3 weight_decay: 0.001',
    "nesterov_inv": 'type: "Nesterov" base_lr: 0.05 lr_policy: "inv" gamma: 0.1 power: 0.75 '
                    'momentum: 0.9 weight_decay: 0.001',
    "adagrad_multistep": 'type: "AdaGrad" base_lr: 0.1 lr_policy: "multistep" gamma: 0.5 '
                         'stepvalue: 1 stepvalue: 2 stepvalue: 4 weight_decay: 0.001',
    "rmsprop_poly": 'type: "RMSProp" base_lr: 0.01 lr_policy: "poly" power: 0.9 max_iter: 10 '
                    'rms_decay: 0.9 delta: 1e-6 weight_decay: 0.001',
    "adadelta_sigmoid": 'type: "AdaDelta" base_lr: 1.0 lr_policy: "sigmoid" gamma: -0.5 stepsize: 2 '
                        'momentum: 0.95 delta: 1e-6 weight_decay: 0.001',
    "adam_default_beta1": 'type: "Adam" base_lr: 0.01 lr_policy: "fixed"',
    "adam_legacy_enum": 'solver_type: ADAM base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 '
                        'weight_decay: 0.005',
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_toy_trajectory_matches_reference(tmp_path, name):
    solver = make_solver(tmp_path, CONFIGS[name])
    param = solver.param
    net = solver.net
    start = [p.detach().numpy().copy() for p in net.learnable_params]
    lr_mults = [p.lr_mult for p in net.learnable_params]
    decay_mults = [p.decay_mult for p in net.learnable_params]
    assert lr_mults == [1, 2, 0, 0] and decay_mults == [1, 0, 1, 1]
    feeds = batches(STEPS)
    expected, history = reference_run(param, start, lr_mults, decay_mults, feeds)
    for step, feed in enumerate(feeds):
        solver.step(1, inputs=feed)
        for k, (p, ref) in enumerate(zip(net.learnable_params, expected[step])):
            got = p.detach().numpy().astype(np.float64)
            tol = 2e-5 * np.abs(ref) + 2e-6 * np.abs(ref).max()
            assert np.all(np.abs(got - ref) <= tol), (name, step, k, np.abs(got - ref).max())
    assert solver.iter == STEPS
    # frozen blobs (lr_mult 0) never move but keep history entries, in learnable order
    np.testing.assert_array_equal(net.learnable_params[2].detach().numpy(), start[2])
    sets = len(history)
    assert len(solver.history) == sets * 4
    for s in range(sets):
        for k in range(4):
            got = solver.history[s * 4 + k].numpy()
            ref = history[s][k]
            assert_close(got, ref, f"history set {s} blob {k}", absfrac=SOLVER_HISTORY_ABSFRAC,
                         floor=SOLVER_HISTORY_ABSFRAC * 1e-3)


def test_iter_size_equals_summed_passes(tmp_path):
    """iter_size 2 on one batch = the diff of two passes halved: same trajectory as iter_size 1."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = make_solver(tmp_path / "one", 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9')
    two = make_solver(tmp_path / "two",
                      'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 iter_size: 2')
    for feed in batches(3):
        one.step(1, inputs=feed)
        two.step(1, inputs=feed)
    for p, q in zip(one.net.learnable_params, two.net.learnable_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clip_reports_global_norm(tmp_path):
    solver = make_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" clip_gradients: 0.01')
    feed = batches(1)[0]
    x, y = feed["x"].astype(np.float64), feed["y"].astype(np.float64)
    w, b = (p.detach().numpy().astype(np.float64) for p in solver.net.learnable_params[:2])
    residual = (x @ w.T + b - y) / 4
    norm = math.sqrt(((residual.T @ x) ** 2).sum() + (residual.sum(0) ** 2).sum())
    solver.step(1, inputs=feed)
    assert solver.last_clip_norm == pytest.approx(norm, rel=1e-5)


@pytest.mark.parametrize("policy, extra, rates", [
    ("fixed", "", [0.1] * 5),
    ("step", "gamma: 0.5 stepsize: 2", [0.1, 0.1, 0.05, 0.05, 0.025]),
    ("exp", "gamma: 0.5", [0.1, 0.05, 0.025, 0.0125, 0.00625]),
    ("inv", "gamma: 1 power: 1", [0.1, 0.05, 0.1 / 3, 0.025, 0.02]),
    ("multistep", "gamma: 0.1 stepvalue: 1 stepvalue: 3", [0.1, 0.01, 0.01, 0.001, 0.001]),
    ("poly", "power: 2 max_iter: 4", [0.1, 0.05625, 0.025, 0.00625, 0.0]),
    ("sigmoid", "gamma: 1 stepsize: 2", [0.1 / (1 + math.exp(2 - i)) for i in range(5)]),
])
def test_lr_policies(policy, extra, rates):
    param = caffe_pb2.SolverParameter()
    from google.protobuf import text_format
    text_format.Parse(f'base_lr: 0.1 lr_policy: "{policy}" {extra}', param)
    step, got = 0, []
    for it in range(5):
        rate, step = learning_rate(param, it, step)
        got.append(rate)
    assert got == pytest.approx(rates, rel=1e-6, abs=1e-12)


def test_multistep_advances_one_step_per_call():
    """Caffe's multistep moves current_step by at most one per update (restarting from a state
    with current_step 0 at iter 5 catches up one step per iteration)."""
    param = caffe_pb2.SolverParameter(base_lr=1, lr_policy="multistep", gamma=0.5, stepvalue=[1, 2])
    assert learning_rate(param, 5, 0) == (0.5, 1)
    assert learning_rate(param, 6, 1) == (0.25, 2)


def test_solver_lr_property_and_last_lr(tmp_path):
    solver = make_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "step" gamma: 0.5 stepsize: 1')
    feeds = batches(2)
    assert solver.lr == pytest.approx(0.1)
    solver.step(1, inputs=feeds[0])
    assert solver.last_lr == pytest.approx(0.1) and solver.lr == pytest.approx(0.05)


def test_step_returns_loss_before_update(tmp_path):
    solver = make_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed"')
    feed = batches(1)[0]
    w, b = (p.detach().numpy().astype(np.float64) for p in solver.net.learnable_params[:2])
    expected = 0.5 * ((feed["x"] @ w.T + b - feed["y"]) ** 2).sum() / 4
    losses = solver.step(1, inputs=feed)
    assert set(losses) == {"loss"} and losses["loss"] == pytest.approx(expected, rel=1e-5)


def test_inputs_callable_gets_iteration(tmp_path):
    solver = make_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed"')
    feeds, seen = batches(3), []

    def feed(iteration):
        seen.append(iteration)
        return feeds[iteration]
    solver.step(3, inputs=feed)
    assert seen == [0, 1, 2]

