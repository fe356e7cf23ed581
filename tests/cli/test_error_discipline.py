"""The command line's error discipline: every failure is one or two lines on stderr and a
non-zero status, never a traceback (unless --debug); one device parser for every verb."""
import re
import sys
import types

import numpy as np
import pytest
import torch

from segaware_caffe.tools import cli
from segaware_caffe.tools.cli import main
from segaware_caffe.tools.common import UsageError, parse_device

NET = """name: "tiny"
input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }
layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }
"""


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    np.save(tmp_path / "x.npy", np.ones((1, 3, 4, 4), np.float32))
    return path


def error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2, err
    return lines


def test_project_error_is_one_line_and_status_1(tmp_path, capsys):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "a" type: "NoSuchType" bottom: "x" top: "y" }')
    assert main(["inspect", str(bad), "--phase", "test"]) == 0   # inspect lists what it cannot build
    capsys.readouterr()
    assert main(["run", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("segaware-caffe run: error: ") and "Traceback" not in err


def test_missing_file_names_it(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.prototxt")]) == 1
    (line,) = error_lines(capsys)
    assert line.startswith("segaware-caffe run: error: ") and "nope.prototxt" in line


def test_os_error_from_open_names_the_file(net, tmp_path, capsys):
    target = tmp_path / "no" / "such" / "dir" / "m.py"
    assert main(["export", str(net), "--python", str(target)]) == 1
    (line,) = error_lines(capsys)
    assert line == f"segaware-caffe export: error: {target}: No such file or directory"


def test_bad_option_value(net, capsys):
    assert main(["run", str(net), "--mean", "a,b,c"]) == 1
    (line,) = error_lines(capsys)
    assert line == "segaware-caffe run: error: --mean must be comma-separated numbers (B,G,R), got 'a,b,c'"


def test_argparse_errors_are_two_lines(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2
    first, second = error_lines(capsys)
    assert first == "segaware-caffe run: error: the following arguments are required: model"
    assert second == "(see segaware-caffe run --help)"
    with pytest.raises(SystemExit):
        main(["nosuchverb"])
    assert "invalid choice: 'nosuchverb'" in error_lines(capsys)[0]


def test_no_verb_prints_help(capsys):
    assert main([]) == 2
    assert "VERB" in capsys.readouterr().out


@pytest.fixture
def fake_verb(monkeypatch):
    """A verb `inspect` whose run raises what the test puts in `raised`."""
    raised = []
    module = types.SimpleNamespace(add_arguments=lambda parser: None,
                                   run=lambda args: (_ for _ in ()).throw(raised[0]))
    real = cli.importlib.import_module

    def fake_import(name):
        return module if name == "segaware_caffe.tools.cmd_inspect" else real(name)
    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    monkeypatch.delenv("SEGAWARE_DEBUG", raising=False)
    return raised


def test_keyboard_interrupt_is_130(fake_verb, capsys):
    fake_verb.append(KeyboardInterrupt())
    assert main(["inspect"]) == 130
    assert error_lines(capsys) == ["segaware-caffe inspect: interrupted"]


def test_unexpected_exception_is_an_internal_error_with_its_place(fake_verb, capsys):
    fake_verb.append(ZeroDivisionError("division by zero"))
    assert main(["inspect"]) == 3
    (line,) = error_lines(capsys)
    assert re.fullmatch(r"segaware-caffe inspect: internal error: ZeroDivisionError: division by "
                        r"zero at test_error_discipline\.py:\d+ \(<genexpr>\) \(run with --debug "
                        r"for the traceback\)", line), line


@pytest.mark.parametrize("how", ["before", "after", "env"])
def test_debug_shows_the_traceback(fake_verb, capsys, monkeypatch, how):
    fake_verb.append(ZeroDivisionError("division by zero"))
    argv = {"before": ["--debug", "inspect"], "after": ["inspect", "--debug"], "env": ["inspect"]}[how]
    if how == "env":
        monkeypatch.setenv("SEGAWARE_DEBUG", "1")
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert "run with --debug" not in err


def test_memory_error_is_reported(fake_verb, capsys):
    fake_verb.append(MemoryError())
    assert main(["inspect"]) == 1
    (line,) = error_lines(capsys)
    assert line.startswith("segaware-caffe inspect: error: not enough memory")


def test_unsupported_feature_is_reported_not_internal(fake_verb, capsys):
    fake_verb.append(NotImplementedError("pool (Pooling): STOCHASTIC pooling is not supported"))
    assert main(["inspect"]) == 1
    assert error_lines(capsys) == ["segaware-caffe inspect: error: pool (Pooling): STOCHASTIC "
                                   "pooling is not supported"]


def test_warnings_are_one_line(tmp_path, capsys):
    text = NET + 'layer { name: "w" type: "MatWrite" bottom: "out" mat_write_param { prefix: "missing/x_" } }\n'
    (tmp_path / "w.prototxt").write_text(text)
    assert main(["inspect", str(tmp_path / "w.prototxt")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^segaware-caffe: warning: w \(MatWrite\): output directory 'missing' does "
                     r"not exist", err, re.M), err
    assert "warnings.warn" not in err


# ---------------------------------------------------------------------------- devices
def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"^--device 'bogus': not a device; expected cpu, cuda or cuda:N$"):
        parse_device("bogus")
    with pytest.raises(UsageError, match=r"^--device meta: device type 'meta' is not supported"):
        parse_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda():
    with pytest.raises(UsageError, match=r"^--device cuda:1: no CUDA device is available on this "
                                         r"machine \(torch .* built with .*\); use --device cpu$"):
        parse_device("cuda:1")


@pytest.mark.parametrize("verb", ["run", "test", "time", "train"])
@pytest.mark.parametrize("device", ["bogus", "cuda"])
def test_every_verb_parses_the_device_the_same_way(verb, device, net, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.1 max_iter: 1')
    argv = {"run": ["run", str(net), "--input", f"data={tmp_path / 'x.npy'}"],
            "test": ["test", "--model", str(net), "--input", f"data={tmp_path / 'x.npy'}"],
            "time": ["time", "--model", str(net)],
            "train": ["train", "--solver", str(tmp_path / "solver.prototxt")]}[verb]
    assert main(argv + ["--device", device]) == 1
    (line,) = error_lines(capsys)
    expected = ("not a device; expected cpu, cuda or cuda:N" if device == "bogus"
                else "no CUDA device is available on this machine")
    assert line.startswith(f"segaware-caffe {verb}: error: --device ") and expected in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_option_without_cuda(net, tmp_path, capsys):
    assert main(["test", "--model", str(net), "--gpu", "0"]) == 1
    (line,) = error_lines(capsys)
    assert line.startswith("segaware-caffe test: error: --gpu 0: no CUDA device is available")
    assert line.endswith("leave out --gpu to run on the CPU")
    assert main(["test", "--model", str(net), "--gpu", "x"]) == 1
    assert error_lines(capsys) == ["segaware-caffe test: error: --gpu expects a device index or "
                                   "'all', got 'x'"]
    with pytest.raises(SystemExit):
        main(["test", "--model", str(net), "--gpu", "0", "--device", "cpu"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_run_on_the_cpu_still_works(net, tmp_path, capsys):
    assert main(["run", str(net), "--input", f"data={tmp_path / 'x.npy'}", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("out (1, 3, 4, 4) min 1 max 1")
