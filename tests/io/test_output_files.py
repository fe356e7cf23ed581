"""Files a user owns: writers refuse to replace them unless asked, create them with the umask's
permissions, and atomic snapshots leave no temporary files behind."""
import os
import stat

import pytest

from segaware_caffe.errors import OutputExistsError, SegawareError
from segaware_caffe.files import (OutsideFolderError, atomic_write, check_inside, open_new,
                                  prepare_output_folder, refuse_existing, write_new)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_new_refuses_an_existing_file(tmp_path):
    target = tmp_path / "w.bin"
    write_new(target, b"first")
    with pytest.raises(OutputExistsError, match=r"w\.bin: file exists; pass overwrite=True to replace it"):
        write_new(target, b"second")
    assert target.read_bytes() == b"first"
    write_new(target, b"second", overwrite=True)
    assert target.read_bytes() == b"second"


def test_the_error_is_a_file_exists_error_and_ours(tmp_path):
    (tmp_path / "a").write_text("x")
    with pytest.raises(FileExistsError) as info:
        refuse_existing(tmp_path / "a", False, hint="pass --force to replace it")
    assert isinstance(info.value, SegawareError)
    assert str(info.value).endswith("a: file exists; pass --force to replace it")


def test_open_new_refuses_a_dangling_link(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(OutputExistsError, match="link: file exists"):
        open_new(tmp_path / "link")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("writer", ["write_new", "atomic_write"])
def test_new_files_follow_the_umask(tmp_path, umask_022, writer):
    target = tmp_path / "out.bin"
    {"write_new": write_new, "atomic_write": atomic_write}[writer](target, b"data")
    assert mode(target) == 0o644, oct(mode(target))


def test_atomic_write_replaces_only_when_asked_and_says_so(tmp_path):
    target = tmp_path / "snap.solverstate"
    assert atomic_write(target, b"one") is False
    with pytest.raises(OutputExistsError, match="snap.solverstate: file exists"):
        atomic_write(target, b"two")
    assert target.read_bytes() == b"one"
    assert atomic_write(target, b"two", overwrite=True) is True
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.solverstate"]   # no temporaries


def test_prepare_output_folder(tmp_path):
    fresh = tmp_path / "a" / "b"
    assert prepare_output_folder(fresh) == str(fresh) and fresh.is_dir()
    prepare_output_folder(fresh)               # empty: fine
    (fresh / "keep.png").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=r"b: folder exists and is not empty; pass overwrite=True"):
        prepare_output_folder(fresh)
    prepare_output_folder(fresh, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="file: exists and is not a folder"):
        prepare_output_folder(tmp_path / "file", overwrite=True)


def test_check_inside(tmp_path):
    (tmp_path / "out").mkdir()
    assert check_inside(tmp_path / "out" / "x_", tmp_path, "prefix") == str(tmp_path / "out" / "x_")
    with pytest.raises(OutsideFolderError, match=r"prefix '.*/out/\.\./x' contains '\.\.'"):
        check_inside(f"{tmp_path}/out/../x", tmp_path, "prefix")
    with pytest.raises(OutsideFolderError, match=r"prefix '/etc/x' is outside the output folder"):
        check_inside("/etc/x", tmp_path, "prefix")
    os.symlink("/tmp", tmp_path / "out" / "escape")
    with pytest.raises(OutsideFolderError, match="is outside the output folder"):
        check_inside(tmp_path / "out" / "escape" / "f", tmp_path, "prefix")


# ---------------------------------------------------------------------------- the writers that use it
def test_snapshot_replaces_like_caffe_but_says_so(tmp_path, caplog, umask_022):
    import logging

    from tests.solver.test_solver_rules import make_solver
    solver = make_solver(tmp_path, f'type: "SGD" base_lr: 0.1 lr_policy: "fixed" '
                                   f'snapshot_prefix: "{tmp_path}/snap"')
    with caplog.at_level(logging.INFO, logger="segaware_caffe.solver"):
        model, state = solver.snapshot()
        assert "Replaced the existing file" not in caplog.text
        solver.snapshot()
    replaced = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert replaced == [f"Replaced the existing file {model}", f"Replaced the existing file {state}"]
    assert mode(model) == 0o644 and mode(state) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt", "snap_iter_0.caffemodel",
                                                          "snap_iter_0.solverstate", "solver.prototxt"]


RUN_NET = """input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }
layer { name: "r" type: "ReLU" bottom: "data" top: "out" }
"""


@pytest.mark.parametrize("suffix", [".npy", ".png"])
def test_run_save_refuses_an_existing_file(tmp_path, capsys, suffix):
    import numpy as np

    from segaware_caffe.tools.cli import main
    (tmp_path / "net.prototxt").write_text(RUN_NET)
    np.save(tmp_path / "x.npy", np.ones((1, 3, 4, 4), np.float32))
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"mine")
    argv = ["run", str(tmp_path / "net.prototxt"), "--input", f"data={tmp_path / 'x.npy'}",
            "--save", str(out)]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == (f"segaware-caffe run: error: {out}: file exists; "
                                               f"pass --force to replace it")
    assert out.read_bytes() == b"mine"
    assert main(argv + ["--force"]) == 0
    assert out.read_bytes() != b"mine" and out.stat().st_size > 50


def test_demo_refuses_a_non_empty_folder(tmp_path, capsys):
    from segaware_caffe.tools.cli import main
    (tmp_path / "holiday.jpg").write_bytes(b"precious")
    assert main(["demo", "--out", str(tmp_path), "--size", "16"]) == 1
    assert capsys.readouterr().err.strip() == (f"segaware-caffe demo: error: {tmp_path}: folder "
                                               f"exists and is not empty; pass --force to write "
                                               f"into it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday.jpg"]
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file"), "--force"]) == 1
    assert "file: exists and is not a folder" in capsys.readouterr().err


def test_export_python_refuses_an_existing_module(tmp_path, capsys):
    from segaware_caffe.tools.cli import main
    (tmp_path / "net.prototxt").write_text(RUN_NET)
    target = tmp_path / "model.py"
    target.write_text("# mine\n")
    assert main(["export", str(tmp_path / "net.prototxt"), "--python", str(target)]) == 1
    assert f"{target}: file exists; pass --force to replace it" in capsys.readouterr().err
    assert target.read_text() == "# mine\n"
    assert main(["export", str(tmp_path / "net.prototxt"), "--python", str(target), "--force"]) == 0
    assert "class " in target.read_text()
