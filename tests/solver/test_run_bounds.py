"""Long runs can be bounded (max_seconds, --max-seconds for train / test / time) and configured
counts beyond any plausible run (iter_size, max_iter, test_iter, batch sizes, --iterations) are
refused within seconds with a message naming the field and how to raise the limit."""
import logging
import time

import pytest

import segaware_caffe as sc
from segaware_caffe import limits
from segaware_caffe.errors import SizeLimitError
from segaware_caffe.solver import Solver
from segaware_caffe.tools.cli import main

NET = """name: "fc"
layer { name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } data_filler { type: "gaussian" } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "out" inner_product_param { num_output: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


def write_solver(tmp_path, body="", net=NET):
    (tmp_path / "net.prototxt").write_text(net)
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                    f'max_iter: 10\nsolver_mode: CPU\nrandom_seed: 3\nsnapshot_after_train: false\n'
                    + body)
    return path


@pytest.mark.parametrize("body, message", [
    ("iter_size: 65536\n", r"solver.prototxt: iter_size 65536 is more forward-backward passes per "
                           r"update than any run plausibly means \(the limit is 1,024\); if it is "
                           r"meant, raise the limit with SEGAWARE_LIMITS=iter_size=65536"),
    ("max_iter: 2147483647\n", r"max_iter 2147483647 is more iterations than any run plausibly "
                               r"means \(the limit is 100,000,000\)"),
    ('test_net: "NET"\ntest_iter: 99999999\ntest_interval: 5\n',
     r"test_iter \(test net #0\) 99999999 is more test passes"),
])
def test_absurd_solver_counts_are_refused(tmp_path, body, message):
    path = write_solver(tmp_path, body.replace("NET", str(tmp_path / "net.prototxt")))
    if "max_iter" in body:
        path.write_text(path.read_text().replace("max_iter: 10\n", ""))
    start = time.monotonic()
    with pytest.raises(SizeLimitError, match=message):
        Solver(path)
    assert time.monotonic() - start < 5


def test_limits_can_be_raised(tmp_path, monkeypatch):
    path = write_solver(tmp_path, "iter_size: 2000\n")
    monkeypatch.setenv(limits.ENV, "iter_size=4096, batch_size=20000")
    assert Solver(path).param.iter_size == 2000
    assert limits.limit("batch_size") == 20000 and limits.limit("test_iter") == 10_000_000
    monkeypatch.delenv(limits.ENV)
    with limits.raised(iter_size=2000):
        Solver(path)
    with pytest.raises(SizeLimitError):
        Solver(path)
    monkeypatch.setenv(limits.ENV, "iter_size")
    with pytest.raises(SizeLimitError, match=r"\$SEGAWARE_LIMITS: expected NAME=N items .* got "
                                             r"'iter_size'"):
        limits.limit("iter_size")
    monkeypatch.setenv(limits.ENV, "iter_size=0")
    with pytest.raises(SizeLimitError, match="iter_size must be >= 1, got 0"):
        limits.limit("iter_size")


def test_a_data_layer_batch_beyond_the_limit_names_the_layer(tmp_path):
    (tmp_path / "list.txt").write_text("a.h5\n")
    text = ('layer { name: "h5" type: "HDF5Data" top: "data" '
            'hdf5_data_param { source: "list.txt" batch_size: 1000000 } }')
    start = time.monotonic()
    with pytest.raises(SizeLimitError, match=r"h5 \(HDF5Data\): hdf5_data_param.batch_size "
                                             r"1000000 is more items read one by one per batch"):
        sc.Net(text, phase="train")
    assert time.monotonic() - start < 5


class SlowClock:
    """time.monotonic for the solver where every reading is 50 ms after the last, so that a
    bound is reached after a known number of checks however fast the passes run."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 0.05
        return self.now


def test_max_seconds_stops_between_passes(tmp_path, caplog, monkeypatch):
    import types

    import segaware_caffe.solver as solver_module
    monkeypatch.setattr(solver_module, "time", types.SimpleNamespace(monotonic=SlowClock().monotonic))
    path = write_solver(tmp_path, "iter_size: 1000\n")
    solver = Solver(path, max_seconds=0.3)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="segaware_caffe.solver"):
        assert solver.step(5) == {}
    assert time.monotonic() - start < 5
    assert solver.iter == 0 and solver.requested_early_exit
    assert solver.stopped_by.startswith("stopped after 0.3 s (max_seconds) at iteration 0, before "
                                        "pass ") and "of 1000 (iter_size); the iteration's " \
                                                         "update was not applied" in solver.stopped_by
    assert all(p.grad is None for p in solver.net.learnable_params)
    assert any("0 iteration(s) completed" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match="max_seconds must be a number of seconds > 0, got 0"):
        Solver(path, max_seconds=0)


def test_max_seconds_bounds_solve_and_the_tests(tmp_path):
    path = write_solver(tmp_path, f'test_net: "{tmp_path / "net.prototxt"}"\ntest_iter: 5000000\n'
                                  f'test_interval: 5\n')
    solver = Solver(path, max_seconds=0.3)
    start = time.monotonic()
    solver.solve()
    assert time.monotonic() - start < 5
    assert "while testing net #0 at iteration 0, after " in solver.stopped_by


def test_cli_bounds(tmp_path, capsys):
    path = write_solver(tmp_path, "iter_size: 1000\n")
    start = time.monotonic()
    assert main(["train", "--solver", str(path), "--max-seconds", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "stopped after 0.3 s (max_seconds)" in err and "Optimization stopped early." in err
    assert main(["train", "--solver", str(path), "--iterations", "1000000000"]) == 1
    assert "--iterations 1000000000 is more iterations than any run plausibly means" in \
        capsys.readouterr().err
    net = tmp_path / "net.prototxt"
    for verb in ("test", "time"):
        assert main([verb, "--model", str(net), "--iterations", "1000000000"]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"segaware-caffe {verb}: error: command line: --iterations "
                               f"1000000000 is more iterations")
        assert main([verb, "--model", str(net), "--phase", "train", "--iterations", "10000000",
                     "--max-seconds", "0.3"]) == 0
        assert "Stopped after 0.3 s (--max-seconds): " in capsys.readouterr().err
    assert time.monotonic() - start < 30
    with pytest.raises(SystemExit):
        main(["time", "--model", str(net), "--max-seconds", "-1"])
    assert "expected a number of seconds > 0, got '-1'" in capsys.readouterr().err

