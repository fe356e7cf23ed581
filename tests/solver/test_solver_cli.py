"""The train / test / time verbs, Caffe-style logs read by a parse_log-like parser, SIGINT, and
the multi-process gradient all-reduce (gloo, 2 processes)."""
import datetime
import io
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from segaware_caffe import caffe_proto
from segaware_caffe.solver import Solver
from segaware_caffe.solvers.glog import glog_to
from tests.solver.test_solver_rules import batches, make_solver
from tests.solver.toy_layers import TOY_NET
from segaware_caffe.tools.cli import main
from segaware_caffe.tools.cmd_train import signal_requests

# ------------------------------------------------------------------ a parse_log.py-style parser
ITERATION = re.compile(r"Iteration (\d+)")
TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")


def line_time(line, year=2024):
    """The glog time stamp of a line ("I1122 04:05:06.123456 ..."), as parse_log reads it."""
    head, stamp = line.strip().split()[:2]
    hour, minute, second = (int(x) for x in stamp[:stamp.rfind(".")].split(":"))
    return datetime.datetime(year, int(head[1:3]), int(head[3:5]), hour, minute, second,
                             int(stamp[stamp.rfind(".") + 1:]))


def parse_log(text):
    """BVLC tools/extra/parse_log.py semantics: start at the 'Solving' line; every line after the
    first 'Iteration N' needs a time stamp; output lines become rows keyed by the last seen
    iteration, with the last learning rate logged before them (Caffe logs an iteration's lr
    after its outputs). Returns (train rows, test rows)."""
    lines = text.splitlines()
    start = next(line_time(line) for line in lines if "Solving" in line)
    train, test = [], []
    iteration, lr = -1, float("nan")
    for line in lines:
        match = ITERATION.search(line)
        if match:
            iteration = int(match.group(1))
        if iteration == -1:
            continue
        seconds = (line_time(line) - start).total_seconds()   # raises on a line without stamp
        match = LEARNING_RATE.search(line)
        if match:
            lr = float(match.group(1))
        for regex, rows in ((TRAIN_OUTPUT, train), (TEST_OUTPUT, test)):
            match = regex.search(line)
            if match:
                if not rows or rows[-1]["NumIters"] != iteration:
                    rows.append({"NumIters": iteration, "Seconds": seconds, "LearningRate": lr})
                rows[-1][match.group(2)] = float(match.group(3))
    for rows in (train, test):
        # parse_log's fix_initial_nan_learning_rate: the lr is logged after the first outputs
        if len(rows) > 1:
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
    return train, test


def test_solver_log_parses_like_parse_log(tmp_path):
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" test_iter: 3 test_interval: 2 base_lr: 0.1 lr_policy: "step" '
        'gamma: 0.5 stepsize: 2 display: 2 max_iter: 4 solver_mode: CPU '
        f'snapshot_prefix: "{tmp_path}/snap"')
    feeds, test_feeds = batches(5), batches(3, seed=7)   # solve() ends with a forward at iter 4
    stream = io.StringIO()
    with glog_to(stream):
        solver = Solver(tmp_path / "solver.prototxt",
                        test_inputs=lambda net_index, i: test_feeds[i])
        solver.solve(inputs=lambda it: feeds[it])
    text = stream.getvalue()
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ solver\.py:\d+\] Solving toy$", text, re.M)
    train, test = parse_log(text)
    assert [r["NumIters"] for r in train] == [0, 2]
    assert [r["LearningRate"] for r in train] == [0.1, 0.1]
    assert re.findall(r"\] Iteration (\d), lr = (\S+)$", text, re.M) == [("0", "0.1"), ("2", "0.05")]
    assert all(set(r) >= {"loss", "out"} for r in train)
    assert [r["NumIters"] for r in test] == [0, 2, 4]   # test_initialization, interval, final
    # the test means are the mean over test_iter batches of the loss with the trained weights
    w, b = (p.detach().numpy().astype(np.float64) for p in solver.net.learnable_params[:2])
    expected = np.mean([0.5 * ((f["x"] @ w.T + b - f["y"]) ** 2).sum() / 4 for f in test_feeds])
    assert test[-1]["loss"] == pytest.approx(expected, rel=1e-5)
    assert "    Test net output #0: loss = " in text and " (* 1 = " in text
    assert re.search(r"Iteration 4, loss = [\d.e+-]+\n.*Iteration 4, Testing net \(#0\)", text)
    assert text.rstrip().endswith("Optimization Done.")


def test_sigint_stops_and_snapshots(tmp_path):
    solver = make_solver(tmp_path, f'type: "SGD" base_lr: 0.1 lr_policy: "fixed" max_iter: 10 '
                                   f'snapshot_prefix: "{tmp_path}/snap"')
    feeds = batches(10)

    def feed(iteration):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)    # Ctrl-C during iteration 2
        return feeds[iteration]
    before = signal.getsignal(signal.SIGINT)    # SIG_IGN in a shell's background job
    with signal_requests(solver, "stop", "snapshot"):
        solver.solve(inputs=feed)
    assert solver.iter == 3 and solver.requested_early_exit
    assert sorted(p.name for p in tmp_path.glob("snap_*")) == ["snap_iter_3.caffemodel",
                                                               "snap_iter_3.solverstate"]
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------ test and time verbs
def toy_files(tmp_path):
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    feed = batches(1)[0]
    for name, array in feed.items():
        np.save(tmp_path / f"{name}.npy", array)
    return feed


def test_test_verb_prints_means(tmp_path, capsys):
    feed = toy_files(tmp_path)
    solver = make_solver(tmp_path, f'type: "SGD" base_lr: 0.1 lr_policy: "fixed" '
                                   f'snapshot_prefix: "{tmp_path}/snap"')
    solver.step(1, inputs=feed)
    model_file, _ = solver.snapshot()
    code = main(["test", "--model", str(tmp_path / "net.prototxt"), "--weights", model_file,
                 "--iterations", "3", "--input", f"x={tmp_path}/x.npy", "--input", f"y={tmp_path}/y.npy"])
    err = capsys.readouterr().err
    assert code == 0, err
    w, b = (p.detach().numpy().astype(np.float64) for p in solver.net.learnable_params[:2])
    expected = 0.5 * ((feed["x"] @ w.T + b - feed["y"]) ** 2).sum() / 4
    loss = float(re.search(r"\] Loss: (\S+)", err).group(1))
    assert loss == pytest.approx(expected, rel=1e-5)
    assert len(re.findall(r"\] Batch \d, loss = ", err)) == 3
    assert re.search(r"\] loss = \S+ \(\* 1 = \S+ loss\)$", err, re.M)
    assert len(re.findall(r"\] out = ", err)) == 8          # one line per element of output 'out'


def test_test_verb_needs_inputs(tmp_path, capsys):
    toy_files(tmp_path)
    assert main(["test", "--model", str(tmp_path / "net.prototxt"), "--iterations", "1"]) == 1
    assert "the net has input 'x': give it with --input x=FILE.npy" in capsys.readouterr().err


def test_time_verb_reports_every_layer(tmp_path, capsys):
    toy_files(tmp_path)
    code = main(["time", "--model", str(tmp_path / "net.prototxt"), "--iterations", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    for layer in ("fc", "frozen", "loss"):
        assert re.search(rf"\] +{layer}\tforward: [\d.e+-]+ ms\.$", err, re.M), layer
        assert re.search(rf"\] +{layer}\tbackward: [\d.e+-]+ ms\.$", err, re.M), layer
    for what in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward",
                 "Total Time"):
        assert re.search(rf"\] {what}: [\d.e+-]+ ms\.$", err, re.M), what
    assert len(re.findall(r"Iteration: \d forward-backward time", err)) == 2


def test_train_verb_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--solver", "s.prototxt", "--weights", "w", "--snapshot", "s"])
    assert "not allowed with argument" in capsys.readouterr().err
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" lr_policy: "fixed"')
    if not torch.cuda.is_available():
        assert main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--gpu", "0"]) == 1
        assert "--gpu 0: no CUDA device is available" in capsys.readouterr().err
    assert main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--set", "X"]) == 1
    assert "--set must look like NAME=VALUE, got 'X'" in capsys.readouterr().err


# ------------------------------------------------------------------ the released vgg config
def make_vgg_experiment(root, reference):
    """config/vgg solver + train net (as released, templated) with a 4-image random dataset."""
    config = reference / "segaware" / "config" / "vgg"
    (root / "config" / "vgg").mkdir(parents=True)
    (root / "model" / "vgg").mkdir(parents=True)
    (root / "list").mkdir()
    (root / "data").mkdir()
    shutil.copy(config / "solver.prototxt", root / "config" / "vgg" / "solver.prototxt")
    train = (config / "train.prototxt").read_text()
    # The released SoftmaxWithLoss names no top; its automatic top is no net output, so Caffe (and
    # we) print no "Train net output" line for it. Name it so the log has lines parse_log reads.
    train = train.replace('bottom: "label_shrink"\n  loss_param', 'bottom: "label_shrink"\n  top: "loss"\n  loss_param')
    (root / "config" / "vgg" / "train_tiny.prototxt").write_text(train)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(root / "data" / f"{i}.jpg")
        label = rng.integers(0, 21, (48, 56), dtype=np.uint8)
        label[:4] = 255
        Image.fromarray(label).save(root / "data" / f"{i}.png")
        lines.append(f"/{i}.jpg /{i}.png")
    (root / "list" / "tiny.txt").write_text("\n".join(lines) + "\n")
    (root / "vars.sh").write_text(
        f"export EXP={root}\nNET_ID=vgg\nTRAIN_SET=tiny\nSTEP=10\nLEARNING_RATE=0.001\nITERS=20\n"
        f"SNAP=10\nSOLVER_MODE=CPU\nBATCH_SIZE=1\nCROP_SIZE=41\nDATASET=voc\nDATA_ROOT={root}/data\n"
        f"EMBS_LR1=1\nEMBS_LR2=2\nMAINSCALE_LR1=1\nMAINSCALE_LR2=2\nNUM_LABELS=21\n")
    return root / "config" / "vgg" / "solver.prototxt", root / "vars.sh"


@pytest.mark.slow
@pytest.mark.slow
def test_train_verb_released_vgg_config(tmp_path, reference, capsys):
    solver_file, vars_file = make_vgg_experiment(tmp_path, reference)
    code = main(["train", "--solver", str(solver_file), "--vars", str(vars_file)])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    train, test = parse_log(err)
    assert [r["NumIters"] for r in train] == [0, 10] and test == []
    assert [r["LearningRate"] for r in train] == [0.001, 0.001]
    assert re.findall(r"\] Iteration (\d+), lr = (\S+)$", err, re.M) == [("0", "0.001"), ("10", "0.0001")]
    assert all(0 < r["loss"] < 10 for r in train)
    model = tmp_path / "model" / "vgg"
    assert sorted(p.name for p in model.iterdir()) == [
        f"train_tiny_iter_{i}.{ext}" for i in (10, 20) for ext in ("caffemodel", "solverstate")]
    assert "Optimization Done." in err

    # resume from the first snapshot and stop at iteration 12
    code = main(["train", "--solver", str(solver_file), "--vars", str(vars_file),
                 "--snapshot", str(model / "train_tiny_iter_10.solverstate"), "--iterations", "12"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert f"Restoring previous solver status from {model}/train_tiny_iter_10.solverstate" in err
    state = caffe_proto.read_solverstate(model / "train_tiny_iter_12.solverstate")
    assert state.iter == 12 and state.current_step == 1 and len(state.history) == 62
    train, _ = parse_log(err)
    assert [r["NumIters"] for r in train] == [10]
    assert re.findall(r"\] Iteration (\d+), lr = (\S+)$", err, re.M) == [("10", "0.0001")]


# ------------------------------------------------------------------ two processes (gloo)
def _rank_main(rank, port, tmp_path, feeds, result_queue):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    try:
        solver = make_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                                       'weight_decay: 0.01')
        solver.step(len(feeds[rank]), inputs=lambda it: feeds[rank][it])
        result_queue.put((rank, [p.detach().numpy().copy() for p in solver.net.learnable_params]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_average_gradients_like_caffe(tmp_path):
    """2 ranks with batches of 4 = one process with the 8-sample batch (the toy loss is a mean
    over the batch): Caffe's P2PSync sums the diffs and divides by the number of solvers."""
    per_rank = [batches(3, seed=1), batches(3, seed=2)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank_main, args=(r, port, tmp_path, per_rank, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = make_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                                   'weight_decay: 0.01')
    joined = [{k: np.concatenate([per_rank[0][i][k], per_rank[1][i][k]]) for k in ("x", "y")}
              for i in range(3)]
    single.step(3, inputs=lambda it: joined[it])
    for k, p in enumerate(single.net.learnable_params):
        np.testing.assert_array_equal(results[0][k], results[1][k])
        np.testing.assert_allclose(results[0][k], p.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_progress_bar_only_on_terminals():
    from segaware_caffe.solvers.glog import ProgressBar
    quiet = io.StringIO()
    bar = ProgressBar(10, stream=quiet)          # not a tty: off
    bar.update(5, 0.5)
    bar.close()
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    bar = ProgressBar(10, stream=shown, enabled=True, width=10)
    bar.update(5, 0.5)
    bar.close()
    assert shown.getvalue() == "\r[#####.....]  5/10 iter  loss 0.5\033[K\n"


def test_progress_bar_shows_speed_and_time_left():
    from segaware_caffe.solvers.glog import ProgressBar, duration
    now = [100.0]
    shown = io.StringIO()
    bar = ProgressBar(100, stream=shown, enabled=True, width=10, unit="batch", clock=lambda: now[0])
    bar.update(0)
    now[0] += 8.0
    bar.update(20, 0.25)                        # 2.5 batches/s, 80 left: 32 s
    assert shown.getvalue().endswith("[##........]  20/100 batch  2.5 batch/s, ETA 0:32  "
                                     "loss 0.25\033[K")
    now[0] += 80.0
    bar.update(30)                              # 30 in 88 s: slower than one per second
    assert "2.93 s/batch, ETA 3:25" in shown.getvalue().rsplit("\r", 1)[-1]
    assert duration(3 * 3600 + 61) == "3:01:01" and duration(59.6) == "1:00"
