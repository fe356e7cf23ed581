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
