"""The benchmark scripts still run: bench/vs_opencv.py and bench/cpu_nets.py with --quick on tiny
nets (each as a user would start it, in a subprocess), and the parts of their logic that decide
what they report."""
import importlib.util
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import GOLDEN, REPO

BENCH = REPO / "bench"
pytest.importorskip("cv2", reason="bench/vs_opencv.py compares with OpenCV (the bench extra)")


def load(script):
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_vs_opencv_quick_runs_and_agrees(tmp_path):
    proc = run_script(BENCH / "vs_opencv.py", "--quick", "--threads", "1", "--nets", "rnet",
                      "--keep", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("rnet ")]
    assert len(rows) == 1, proc.stdout
    cols = rows[0]
    threads, ours_ms, cv_ms, ratio = int(cols[1]), float(cols[2]), float(cols[3]), float(cols[4])
    assert threads == 1 and ours_ms > 0 and cv_ms > 0
    assert ratio == pytest.approx(ours_ms / cv_ms, rel=0.02, abs=0.01)
    assert float(cols[9]) <= 1e-4                   # max difference relative to max|opencv|
    # the net and weights both implementations read were kept where asked; the random weights
    # are calibrated: the last layer's output has unit std and the softmax is not saturated (a
    # saturated output would compare equal whatever the implementations compute)
    assert {p.name for p in tmp_path.iterdir()} == {"rnet.prototxt", "rnet.caffemodel"}
    import torch
    import segaware_caffe as sc
    vs = load("vs_opencv")
    net = sc.Net(tmp_path / "rnet.prototxt", weights=tmp_path / "rnet.caffemodel")
    inputs = {k: torch.from_numpy(v) for k, v in vs.net_inputs(net, "rnet").items()}
    with torch.no_grad():
        out = net.forward(outputs=["conv5-1", "prob1"], **inputs)
    assert out["conv5-1"].std().item() == pytest.approx(1.0, rel=1e-3)
    assert 0.001 < out["prob1"].min().item() and out["prob1"].max().item() < 0.999


def test_vs_opencv_random_batchnorm_statistics():
    """BatchNorm gets a stored scale factor other than 1 (OpenCV must divide by it too), positive
    variances, and Scale factors near 1."""
    import torch
    import segaware_caffe as sc
    vs = load("vs_opencv")
    p = vs.Proto("bn")
    x = p.input("data", (2, 3, 5, 7))
    x = p.conv("conv", x, 4, 3)
    p.bn_scale("bn", x, "scale")
    net = sc.Net(p.text())
    vs.randomize_weights(net, 0)
    bn, scale = (next(r.module for r in net.records if r.type == t) for t in ("BatchNorm", "Scale"))
    factor = bn.scale_factor.item()
    assert 0.5 <= factor <= 2.0 and factor != 1.0
    assert (bn.variance_sum > 0).all() and bn.mean_sum.abs().max() > 0
    assert ((scale.caffe_blobs()[0] - 1).abs() <= 0.2).all()
    vs.calibrate(net, {"data": torch.randn(2, 3, 5, 7)})   # rescales the conv; BatchNorm untouched
    assert bn.scale_factor.item() == factor


def test_vs_opencv_relative_difference_and_failure_exit(monkeypatch, capsys):
    vs = load("vs_opencv")
    ref = {"a": np.array([1.0, -4.0, 2.0]), "b": np.array([[0.5, 0.25]])}
    assert vs.relative_difference(ref, ref) == (0.0, "a")
    diff, where = vs.relative_difference({"a": ref["a"], "b": np.array([[0.5, 0.2]])}, ref)
    assert where == "b" and diff == pytest.approx(0.05 / 0.5)
    assert vs.relative_difference({"a": ref["a"], "b": np.zeros(3)}, ref)[0] == math.inf
    # a disagreeing net is reported in its row and makes the script exit with status 1
    fake = {"ours_ms": 2.0, "cv_ms": 1.0, "build_ours_s": 0.1, "build_cv_s": 0.01,
            "first_ours_ms": 3.0, "first_cv_ms": 2.0, "import_ours_s": 1.0, "import_cv_s": 0.1,
            "diff": 3e-4, "worst_output": "prob1", "load": 1.0}
    monkeypatch.setattr(vs, "prepare", lambda name, workdir: (None, None))
    monkeypatch.setattr(vs, "run_child", lambda name, threads, files, args: (fake, None))
    assert vs.main(["--nets", "rnet", "--threads", "1", "--quick"]) == 1
    captured = capsys.readouterr()
    assert re.search(r"rnet\s+1\s+2\.00\s+1\.00\s+2\.00 .*DISAGREE \(prob1\)", captured.out)
    assert "outputs disagree" in captured.err and "prob1" in captured.err
    # a child that crashed is a failure too, with its error
    monkeypatch.setattr(vs, "run_child", lambda name, threads, files, args: (None, "Traceback: boom"))
    assert vs.main(["--nets", "rnet", "--threads", "1"]) == 1
    assert "boom" in capsys.readouterr().err


def test_cpu_nets_quick_runs_with_flops_and_gemm_rate():
    net = GOLDEN / "layers" / "segaware_conv" / "net.prototxt"   # one fusable segaware conv
    proc = run_script(BENCH / "cpu_nets.py", "--quick", "--threads", "1", "--nets", net,
                      "--variants", "fused", "--backward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("net ")]
    by_variant = {" ".join(cols[1:3]): cols for cols in rows if cols[2] in ("fwd", "fwd+bwd")}
    assert set(by_variant) == {"fused fwd", "fused fwd+bwd"}
    forward_flops = 2 * 2 * 5 * 11 * 12 * 3 * 9     # x (2, 3, 11, 12) -> 5 outputs, 3x3
    for variant, cols in by_variant.items():
        median_s, gflop, achieved, gemm = float(cols[5]), float(cols[8]), float(cols[9]), float(cols[10])
        bound_s, ratio = float(cols[12]), float(cols[13])
        expected = forward_flops * (3 if "bwd" in variant else 1)
        assert gflop == pytest.approx(expected / 1e9, rel=1e-3), variant
        assert gemm > 0 and median_s > 0
        assert achieved == pytest.approx(gflop / median_s, rel=0.05)
        assert bound_s == pytest.approx(gflop / gemm, rel=0.05)
        assert ratio == pytest.approx(median_s / bound_s, rel=0.05)
    assert "(1 fused convs)" in proc.stdout


def test_cpu_nets_gemm_rate_is_a_rate():
    import torch
    samples = load("cpu_nets").gemm_rate(torch, 64, 3)
    assert len(samples) == 3 and all(s > 0 for s in samples)
