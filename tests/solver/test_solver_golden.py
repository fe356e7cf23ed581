"""Every golden solver case of the original Caffe: loss, learning rate, clipping norm and all
parameters after each of the 4 steps; the sgd_step_momentum_wd case also resumes from the
original's .solverstate and compares its history with ours."""
import json

import numpy as np
import pytest

from segaware_caffe import caffe_proto
from segaware_caffe.solver import Solver
from tests.conftest import GOLDEN
from tests.golden.test_golden import assert_close

CASES = sorted(p.parent.name for p in (GOLDEN / "solver").glob("*/solver.prototxt"))

ADAPTIVE = {"AdaGrad", "RMSProp", "AdaDelta", "Adam"}
STEPS = 4


def case_dir(name):
    return GOLDEN / "solver" / name


def feed(data, k):
    return {"data": data[f"in/data/{k}"], "label": data[f"in/label/{k}"]}


def tolerance(solver):
    # tests/tolerances.py: 1e-4 |ref| + 1e-5 max|ref| for the SGD family, about 10x for adaptive rules
    return (1e-3, 1e-4) if solver.param.type in ADAPTIVE else (1e-4, 1e-5)


def noise_gradient_blobs(solver, inputs):
    """Blobs whose gradient is float32 rounding noise (|g| < 1e-6 of the net's largest): the
    embedding bias `emb` blob 1, because L1 distances between embeddings do not depend on a
    per-channel bias, so its exact gradient is 0. Caffe's and our values are different noise, and
    AdaGrad/RMSProp turn noise g into steps of about local_rate * g / delta."""
    out = solver.net.forward(**inputs)
    solver.net.loss(out).backward()
    grads = {(layer, i): (0.0 if b.grad is None else float(b.grad.abs().max()))
             for layer, blobs in solver.net.params.items() for i, b in enumerate(blobs)}
    for blob in solver.net.learnable_params:
        blob.grad = None
    largest = max(grads.values())
    return {key for key, g in grads.items() if g < 1e-6 * largest and g > 0}


def compare_params(solver, data, key, what, noise_blobs=(), noise_errors=None):
    rel, absfrac = tolerance(solver)
    worst = 0.0
    for layer, blobs in solver.net.params.items():
        for i, blob in enumerate(blobs):
            ref = data[key.format(layer=layer, i=i)]
            if (layer, i) in noise_blobs:
                # no trajectory to reproduce (see noise_gradient_blobs): both runs must stay
                # within 10% of the blob's scale of each other (measured: up to 4.7e-2, RMSProp)
                err = np.abs(blob.detach().numpy() - ref).max() / np.abs(ref).max()
                assert err <= 0.1, f"{what}: {layer} blob {i}: error {err:.3g} of max|ref|"
                if noise_errors is not None:
                    noise_errors.append(err)
                continue
            # atleast_1d: the shared assert_close cannot index 0-d arrays (Scale's scalar blob)
            err = assert_close(np.atleast_1d(blob.detach().numpy()), np.atleast_1d(ref),
                               f"{what}: {layer} blob {i}",
                               rel=rel, absfrac=absfrac)
            worst = max(worst, err)
    return worst


def test_golden_solver_cases_found():
    assert len(CASES) == 14, CASES


@pytest.mark.parametrize("name", CASES)
def test_golden_solver_trajectory(name, tmp_path, monkeypatch):
    case = case_dir(name)
    meta = json.loads((case / "meta.json").read_text())
    data = np.load(case / "data.npz")
    monkeypatch.chdir(tmp_path)       # net.prototxt is found beside the solver file
    solver = Solver(case / "solver.prototxt", weights=case / meta["weights"])
    compare_params(solver, data, "param/{layer}/{i}/0", "init")
    noise = noise_gradient_blobs(solver, feed(data, 0)) if solver.param.type in ADAPTIVE else set()
    assert noise <= {("emb", 1)}, noise
    worst_param, worst_loss, noise_errors = 0.0, 0.0, []
    for k in range(STEPS):
        lr_key = f"lr/{k}"
        if lr_key in data.files:
            assert f"{solver.lr:.6g}" == f"{float(data[lr_key]):.6g}", f"iteration {k}: learning rate"
        losses = solver.step(1, inputs=feed(data, k))
        ref_loss = float(data[f"loss/{k}"])
        assert losses["loss"] == pytest.approx(ref_loss, rel=1e-5), f"iteration {k}: loss"
        worst_loss = max(worst_loss, abs(losses["loss"] - ref_loss) / abs(ref_loss))
        clip_key = f"clip_l2norm/{k}"
        if clip_key in data.files:
            assert solver.last_clip_norm == pytest.approx(float(data[clip_key]), rel=1e-5), \
                f"iteration {k}: clipped gradient norm"
        worst_param = max(worst_param, compare_params(solver, data, f"param/{{layer}}/{{i}}/{k + 1}",
                                                      f"after step {k + 1}", noise, noise_errors))
    print(f"solver/{name}: max relative error params {worst_param:.2e}, loss {worst_loss:.2e}"
          + (f"; noise-gradient blobs {sorted(noise)} {max(noise_errors):.2e}" if noise else ""))


def test_golden_resume_from_original_solverstate(tmp_path, monkeypatch):
    case = case_dir("sgd_step_momentum_wd")
    data = np.load(case / "data.npz")
    monkeypatch.chdir(tmp_path)       # learned_net is found beside the .solverstate
    solver = Solver(case / "solver.prototxt", weights=case / "init.caffemodel")
    solver.restore(case / "snap_iter_2.solverstate")
    assert solver.iter == 2 and solver.current_step == 0
    compare_params(solver, data, "param/{layer}/{i}/2", "restored weights")
    worst = 0.0
    for k in (2, 3):
        solver.step(1, inputs=feed(data, k))
        worst = max(worst, compare_params(solver, data, f"resume/param/{{layer}}/{{i}}/{k + 1}",
                                          f"resumed step {k + 1}"))
    print(f"solver/sgd_step_momentum_wd resume: max relative error {worst:.2e}")


def test_golden_history_matches_original_snapshot(tmp_path):
    """After 2 steps our history blobs (order, shapes, values) equal the original's .solverstate,
    and our snapshot files hold the same history and weights."""
    case = case_dir("sgd_step_momentum_wd")
    data = np.load(case / "data.npz")
    solver = Solver(case / "solver.prototxt", weights=case / "init.caffemodel")
    for k in range(2):
        solver.step(1, inputs=feed(data, k))
    original = caffe_proto.read_solverstate(case / "snap_iter_2.solverstate")
    assert len(original.history) == len(solver.history)
    for i, (blob, ours) in enumerate(zip(original.history, solver.history)):
        assert_close(np.atleast_1d(ours.numpy()), np.atleast_1d(caffe_proto.blob_to_array(blob)),
                     f"history blob {i}")
    solver.snapshot_prefix = str(tmp_path / "snap")
    model_file, state_file = solver.snapshot()
    assert model_file == str(tmp_path / "snap_iter_2.caffemodel")
    ours = caffe_proto.read_solverstate(state_file)
    assert (ours.iter, ours.current_step, ours.learned_net) == (2, 0, model_file)
    for i, (a, b) in enumerate(zip(ours.history, original.history)):
        assert caffe_proto.blob_shape(a) == caffe_proto.blob_shape(b), f"history blob {i} shape"
    weights = caffe_proto.weights_to_arrays(caffe_proto.read_weights(model_file))
    for layer, blobs in weights.items():
        for i, array in enumerate(blobs):
            assert_close(np.atleast_1d(array), np.atleast_1d(data[f"param/{layer}/{i}/2"]),
                         f"snapshot {layer} blob {i}")
