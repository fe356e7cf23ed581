"""`segaware-caffe plot LOG`: curves from our training log and from the original caffe binary's,
as a PNG with matplotlib, as CSV without it, and a clear message when matplotlib is missing."""
import csv
import importlib.util
import io
import sys

import pytest

from segaware_caffe.solver import Solver
from segaware_caffe.solvers.glog import glog_to
from segaware_caffe.tools.cli import main
from segaware_caffe.tools.cmd_plot import parse_log
from tests.solver.test_solver_rules import batches
from tests.solver.toy_layers import TOY_NET

# the original binary's lines (BVLC's later "Iteration N (x iter/s, ...)" form included)
CAFFE_LOG = """\
I1122 04:05:06.000001 12345 solver.cpp:330] Iteration 0, Testing net (#0)
I1122 04:05:06.100000 12345 solver.cpp:397]     Test net output #0: accuracy = 0.1
I1122 04:05:06.100001 12345 solver.cpp:397]     Test net output #1: loss = 2.3 (* 1 = 2.3 loss)
I1122 04:05:07.000000 12345 solver.cpp:218] Iteration 0 (0 iter/s, 0.9s/20 iters), loss = 2.31
I1122 04:05:07.000001 12345 solver.cpp:237]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)
I1122 04:05:07.000002 12345 sgd_solver.cpp:105] Iteration 0, lr = 0.01
I1122 04:05:09.000000 12345 solver.cpp:218] Iteration 20 (10 iter/s, 2s/20 iters), loss = 1.5
I1122 04:05:09.000001 12345 solver.cpp:237]     Train net output #0: loss = 1.4 (* 1 = 1.4 loss)
I1122 04:05:09.000002 12345 sgd_solver.cpp:105] Iteration 20, lr = 0.001
I1122 04:05:10.000000 12345 solver.cpp:330] Iteration 40, Testing net (#0)
I1122 04:05:10.100000 12345 solver.cpp:397]     Test net output #0: accuracy = 0.6
I1122 04:05:10.100001 12345 solver.cpp:397]     Test net output #1: loss = 1.1 (* 1 = 1.1 loss)
"""
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_parse_the_original_binarys_log():
    series, losses = parse_log(CAFFE_LOG)
    assert series["train loss (smoothed)"] == [(0, 2.31), (20, 1.5)]
    assert series["train loss"] == [(0, 2.31), (20, 1.4)]
    assert series["lr"] == [(0, 0.01), (20, 0.001)]
    assert series["test accuracy"] == [(0, 0.1), (40, 0.6)]
    assert series["test loss"] == [(0, 2.3), (40, 1.1)]
    assert losses == {"train loss (smoothed)", "train loss", "test loss"}   # accuracy: no loss


def our_log(tmp_path):
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" test_iter: 2 test_interval: 2 base_lr: 0.1 lr_policy: "step" '
        'gamma: 0.5 stepsize: 2 display: 1 max_iter: 4 solver_mode: CPU snapshot_after_train: false')
    feeds, test_feeds = batches(5), batches(2, seed=7)
    stream = io.StringIO()
    with glog_to(stream):
        solver = Solver(tmp_path / "solver.prototxt", test_inputs=lambda n, i: test_feeds[i])
        solver.solve(inputs=lambda it: feeds[it])
    (tmp_path / "train.log").write_text(stream.getvalue())
    return tmp_path / "train.log"


def test_parse_our_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    series, losses = parse_log(our_log(tmp_path).read_text())
    assert [it for it, _ in series["train loss (smoothed)"]] == [0, 1, 2, 3, 4]
    assert [it for it, _ in series["train loss"]] == [0, 1, 2, 3]
    assert series["lr"] == [(0, 0.1), (1, 0.1), (2, 0.05), (3, 0.05)]
    assert [it for it, _ in series["test loss"]] == [0, 2, 4]
    assert {"train loss", "test loss"} <= losses and "test out" not in losses


def test_csv_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    log = our_log(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # as if it were not installed
    assert main(["plot", str(log)]) == 1
    err = capsys.readouterr().err
    assert "plot draws with matplotlib, which is not installed: pip install 'segaware-caffe[plot]'" in err
    assert not (tmp_path / "train.png").exists()
    assert main(["plot", str(log), "--no-png", "--csv", str(tmp_path / "curves.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert {r["series"] for r in rows} >= {"train loss (smoothed)", "lr", "test loss"}
    assert main(["plot", str(log), "--no-png", "--csv", str(tmp_path / "curves.csv")]) == 1
    assert "curves.csv: file exists; pass --force" in capsys.readouterr().err


def test_a_log_without_curves_is_an_error(tmp_path, capsys):
    (tmp_path / "empty.log").write_text("nothing here\n")
    assert main(["plot", str(tmp_path / "empty.log"), "--no-png", "--csv", str(tmp_path / "c.csv")]) == 1
    assert "no 'Iteration N, loss = ...'" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed (pip install "
                                                "'segaware-caffe[plot]'); the PNG is not drawn")
def test_png_of_the_original_log(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "caffe.log").write_text(CAFFE_LOG)
    assert main(["plot", str(tmp_path / "caffe.log")]) == 0
    image = Image.open(tmp_path / "caffe.png")
    assert image.format == "PNG" and image.size == (800, 840)     # three panels
    assert "train loss (smoothed) (2 points)" in capsys.readouterr().out
