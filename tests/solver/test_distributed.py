"""Two processes (gloo, CPU) training one net from random fillers, fine-tuned from a weights file
that lacks a new layer: rank 0's parameters, history and iteration reach rank 1 before the first
step, the parameters are identical on both ranks after every step (also after resuming from
different snapshots), equal to one process training on both ranks' data, and a rank that
changes its parameters on its own is caught at the next snapshot."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from segaware_caffe.distributed import first_disagreement, layer_digests

NET = """
name: "finetune"
input: "x" input_shape { dim: 4 dim: 5 }
input: "y" input_shape { dim: 4 dim: 2 }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "uniform" min: -0.1 max: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "frozen" type: "InnerProduct" bottom: "h" top: "g"
  param { lr_mult: 0 } param { lr_mult: 0 }
  inner_product_param { num_output: 6 weight_filler { type: "xavier" }
                        bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fc_new" type: "InnerProduct" bottom: "g" top: "out"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" }
                        bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""
PRETRAINED = """
name: "pretrained"
input: "x" input_shape { dim: 1 dim: 5 }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.1 } } }
"""
STEPS, RESUMED_STEPS = 3, 2


def solver_text(tmp_path):
    return (f'net: "{tmp_path}/net.prototxt" type: "Adam" base_lr: 0.05 lr_policy: "fixed" '
            f'momentum: 0.9 momentum2: 0.999 weight_decay: 0.001 random_seed: 11 snapshot: 1 '
            f'snapshot_prefix: "{tmp_path}/snap" solver_mode: CPU')


def feeds(rank, count):
    rng = np.random.default_rng(100 + rank)
    return [{"x": rng.normal(size=(4, 5)).astype(np.float32),
             "y": rng.normal(size=(4, 2)).astype(np.float32)} for _ in range(count)]


def params(solver):
    return [p.detach().numpy().copy() for _, _, p in _blobs(solver)]


def _blobs(solver):
    from segaware_caffe.distributed import unique_blobs
    return unique_blobs(solver.net)


def _rank_main(rank, port, tmp_path, queue):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from segaware_caffe.errors import SolverError
    from segaware_caffe.solver import Solver
    out = {"rank": rank, "steps": [], "resumed": []}
    try:
        solver = Solver(tmp_path / "solver.prototxt", weights=str(tmp_path / "pretrained.caffemodel"))
        out["before_sync"] = layer_digests(solver.net)
        data = feeds(rank, STEPS + RESUMED_STEPS)
        for it in range(STEPS):
            solver.step(1, inputs=data[it])     # snapshots iterations 1, 2, 3 (rank 0 writes)
            out["steps"].append(params(solver))
        # a process that changes its parameters on its own is caught at the next snapshot
        with torch.no_grad():
            if rank == 1:
                solver.net.params["fc_new"][0][0, 0] += 1e-3
        try:
            solver.checked_snapshot()
        except SolverError as e:
            out["error"] = str(e)
        dist.barrier()
        # resume from different snapshots: rank 0's state (iteration 3) is the one both continue
        resumed = Solver(tmp_path / "solver.prototxt")
        resumed.restore(tmp_path / f"snap_iter_{3 if rank == 0 else 1}.solverstate")
        for it in range(STEPS, STEPS + RESUMED_STEPS):
            resumed.step(1, inputs=data[it])
            out["resumed"].append(params(resumed) + [h.numpy().copy() for h in resumed.history])
        out["iter"] = resumed.iter
    except Exception as e:  # reported by the parent with the rank
        out["failure"] = f"{type(e).__name__}: {e}"
    finally:
        queue.put(out)
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def joined(count):
    a, b = feeds(0, count), feeds(1, count)
    return [{k: np.concatenate([a[i][k], b[i][k]]) for k in ("x", "y")} for i in range(count)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from segaware_caffe import Net
    tmp_path = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(3)
    Net(PRETRAINED).save_weights(tmp_path / "pretrained.caffemodel")
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(solver_text(tmp_path))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, tmp_path, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        out = queue.get(timeout=300)
        results[out["rank"]] = out
    for p in procs:
        p.join(timeout=60)
    for rank, out in results.items():
        assert "failure" not in out, f"rank {rank}: {out['failure']}"
    return tmp_path, results


def test_ranks_start_from_rank_0_and_stay_identical(two_ranks):
    tmp_path, results = two_ranks
    # the fillers differed (seed random_seed + rank) in the new and the frozen layer, not in fc1
    differ = {a[0] for a, b in zip(results[0]["before_sync"], results[1]["before_sync"]) if a != b}
    assert differ == {"frozen", "fc_new"}
    for step in range(STEPS):
        for k, (mine, theirs) in enumerate(zip(results[0]["steps"][step], results[1]["steps"][step])):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"step {step}, blob {k}")
    for step in range(RESUMED_STEPS):
        for k, (mine, theirs) in enumerate(zip(results[0]["resumed"][step], results[1]["resumed"][step])):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"resumed step {step}, blob {k}")
    assert results[0]["iter"] == results[1]["iter"] == STEPS + RESUMED_STEPS


def test_ranks_follow_one_process_on_both_ranks_data(two_ranks, tmp_path):
    """rank 0 drew its fillers with random_seed + 0, as one process does: that process, fed both
    ranks' batches at once (the loss is a mean over the batch), takes the same steps."""
    from segaware_caffe.solver import Solver
    source, results = two_ranks
    (tmp_path / "solver.prototxt").write_text(solver_text(tmp_path).replace("snapshot: 1 ", ""))
    (tmp_path / "net.prototxt").write_text(NET)
    single = Solver(tmp_path / "solver.prototxt", weights=str(source / "pretrained.caffemodel"))
    data = joined(STEPS + RESUMED_STEPS)
    for step in range(STEPS + RESUMED_STEPS):
        single.step(1, inputs=data[step])
        got = results[0]["steps"][step] if step < STEPS else results[0]["resumed"][step - STEPS]
        for k, p in enumerate(params(single)):
            np.testing.assert_allclose(got[k], p, rtol=2e-5, atol=1e-6, err_msg=f"step {step}, blob {k}")


def test_diverged_rank_is_an_error_naming_ranks_and_layer(two_ranks):
    _, results = two_ranks
    for rank in (0, 1):
        message = results[rank].get("error", "")
        assert "the 2 processes disagree on the parameters at the snapshot of iteration 3" in message
        assert "rank 0 and rank 1 differ first at layer fc_new" in message


def test_first_disagreement_names_the_first_layer():
    a = [("conv1", 1, 0.5), ("conv2", 2, 1.0), ("fc", 3, 2.0)]
    b = [("conv1", 1, 0.5), ("conv2", 9, 1.5), ("fc", 8, 2.5)]
    assert first_disagreement([a, a, a]) is None
    assert first_disagreement([a, a, b]) == (0, 2, "conv2", 1.0, 1.5)
    assert first_disagreement([a, a[:2]])[2] == "(a different number of layers)"


def test_one_process_logs_the_checksum(tmp_path, caplog):
    import logging
    from segaware_caffe.solver import Solver
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(solver_text(tmp_path))
    solver = Solver(tmp_path / "solver.prototxt")
    with caplog.at_level(logging.INFO, logger="segaware_caffe"):
        solver.step(1, inputs=feeds(0, 1)[0])
    expected = sum(float(np.sum(p, dtype=np.float64)) for p in params(solver))
    lines = [r.getMessage() for r in caplog.records if "parameter checksum" in r.getMessage()]
    assert lines[0].startswith("Iteration 0, parameter checksum = ")
    assert lines[1].startswith("Iteration 1, parameter checksum = ")   # at the snapshot
    assert float(lines[1].split("= ")[1]) == pytest.approx(expected, rel=1e-12)
