"""HDF5Data and HDF5Output on generated files: Caffe's walk over rows and files (batches across
file boundaries, wrap-around, shuffle), dataset checks, writing and the no-overwrite rule."""
import sys

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.data import DataError, WORKERS_ENV

h5py = pytest.importorskip("h5py", reason="HDF5Data/HDF5Output need h5py (pip install segaware-caffe[data])")

ROWS = (3, 1, 4)       # rows of f0.h5, f1.h5, f2.h5


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "0")


@pytest.fixture
def files(tmp_path):
    """Three files with a float `data` (n, 2, 3), an integer `label` (n, 1) and a float64 `extra`
    (n,); the row values say which file and row they come from."""
    arrays = []
    for i, n in enumerate(ROWS):
        data = (100 * i + np.arange(n)[:, None, None] + np.linspace(0, 0.5, 6).reshape(2, 3))
        label = (10 * i + np.arange(n)).reshape(n, 1).astype(np.int32)
        extra = (1000.0 * i + np.arange(n)) / 3.0
        with h5py.File(tmp_path / f"f{i}.h5", "w") as f:
            f["data"] = data.astype(np.float32)
            f["label"] = label
            f["extra"] = extra
        arrays.append((data.astype(np.float32), label.astype(np.float32),
                       extra.astype(np.float32)))
    (tmp_path / "list.txt").write_text("f0.h5 f1.h5\n\nf2.h5\n")
    return arrays


def net_text(tops=("data", "label"), batch=4, extra=""):
    top_text = " ".join(f'top: "{t}"' for t in tops)
    return (f'name: "h5" layer {{ name: "h5" type: "HDF5Data" {top_text} '
            f'hdf5_data_param {{ source: "list.txt" batch_size: {batch} {extra} }} }}')


def make_net(tmp_path, text, **kwargs):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return sc.Net(path, **kwargs)


def reference_batches(arrays, batch, count, top=0):
    """Caffe's walk without shuffle: rows of each file in order, files in list order, wrapping."""
    rows = [a[top][r] for a in arrays for r in range(len(a[top]))]
    return [np.stack([rows[(b * batch + i) % len(rows)] for i in range(batch)]) for b in range(count)]


@pytest.mark.parametrize("batch", [4, 3, 11])
def test_batches_cross_files_and_wrap(tmp_path, files, batch):
    # the list sits beside the prototxt, the .h5 names in it are relative: found there too
    net = make_net(tmp_path, net_text(batch=batch))
    assert net.blob_shapes["data"] == (batch, 2, 3) and net.blob_shapes["label"] == (batch, 1)
    want_data = reference_batches(files, batch, 4, 0)
    want_label = reference_batches(files, batch, 4, 1)
    for b in range(4):
        out = net.forward()
        np.testing.assert_array_equal(out["data"].numpy(), want_data[b])
        np.testing.assert_array_equal(out["label"].numpy(), want_label[b])


def test_tops_read_the_datasets_of_their_names_integer_and_double_as_float(tmp_path, files):
    net = make_net(tmp_path, net_text(tops=("extra", "label"), batch=5))
    out = net.forward()
    assert out["extra"].dtype == torch.float32 and out["extra"].shape == (5,)
    np.testing.assert_array_equal(out["extra"].numpy(), reference_batches(files, 5, 1, 2)[0])


def test_shuffle_visits_every_row_once_per_pass_and_follows_torch_seed(tmp_path, files):
    total = sum(ROWS)
    torch.manual_seed(3)
    net = make_net(tmp_path, net_text(tops=("label",), batch=total, extra="shuffle: true"))
    passes = [net.forward()["label"].numpy().ravel() for _ in range(3)]
    everything = sorted(float(v) for a in files for v in a[1].ravel())
    for labels in passes:
        assert sorted(labels.tolist()) == everything
        # one file at a time: the rows of a file are contiguous within a pass
        owners = [int(v) // 10 for v in labels]
        assert sum(a != b for a, b in zip(owners, owners[1:])) == len(ROWS) - 1
    unshuffled = np.concatenate([a[1].ravel() for a in files])
    assert any(not np.array_equal(p, unshuffled) for p in passes)
    torch.manual_seed(3)
    again = make_net(tmp_path, net_text(tops=("label",), batch=total, extra="shuffle: true"))
    np.testing.assert_array_equal(again.forward()["label"].numpy().ravel(), passes[0])


def test_empty_file_in_the_list_is_skipped(tmp_path, files):
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["data"] = np.zeros((0, 2, 3), np.float32)
        f["label"] = np.zeros((0, 1), np.float32)
    (tmp_path / "list.txt").write_text("f0.h5 empty.h5 f1.h5 f2.h5")
    net = make_net(tmp_path, net_text(batch=8))
    np.testing.assert_array_equal(net.forward()["label"].numpy(), reference_batches(files, 8, 1, 1)[0])


def test_all_files_empty_is_a_data_error(tmp_path):
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["data"] = np.zeros((0, 2), np.float32)
    (tmp_path / "list.txt").write_text("empty.h5 empty.h5")
    net = make_net(tmp_path, net_text(tops=("data",)))
    with pytest.raises(DataError, match="every HDF5 file of the list is empty"):
        net.forward()


def test_worker_process_gives_the_same_batches(tmp_path, files, monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "3")   # a stream uses at most one worker
    net = make_net(tmp_path, net_text(batch=5))
    assert net.layers["h5"].stream.loader.num_workers == 1
    got = [net.forward()["label"].numpy() for _ in range(3)]
    for g, w in zip(got, reference_batches(files, 5, 3, 1)):
        np.testing.assert_array_equal(g, w)
    net.layers["h5"].close()


def test_follows_net_dtype(tmp_path, files):
    net = make_net(tmp_path, net_text(), dtype=torch.float64)
    out = net.forward()
    assert out["data"].dtype == torch.float64
    np.testing.assert_array_equal(out["data"].numpy(), reference_batches(files, 4, 1, 0)[0])


@pytest.mark.parametrize("extra, message", [
    ("batch_size: 0", "batch_size must be > 0"),
])
def test_setting_errors(tmp_path, files, extra, message):
    text = net_text(batch=4).replace("batch_size: 4", extra)
    with pytest.raises(sc.NetBuildError, match=message):
        make_net(tmp_path, text)


def test_transform_param_is_refused(tmp_path, files):
    text = net_text()[:-2] + " transform_param { scale: 2 } }"
    with pytest.raises(sc.NetBuildError, match=r"h5 \(HDF5Data\).*does not transform data"):
        make_net(tmp_path, text)


def test_missing_dataset_in_first_file_is_a_build_error_naming_file_and_dataset(tmp_path, files):
    with pytest.raises(DataError, match=r"h5 \(HDF5Data\): .*f0\.h5 has no dataset 'nope'.*data, extra, label"):
        make_net(tmp_path, net_text(tops=("data", "nope")))


def test_missing_dataset_in_a_later_file_is_a_data_error(tmp_path, files):
    with h5py.File(tmp_path / "f1.h5", "w") as f:
        f["data"] = np.zeros((1, 2, 3), np.float32)
    net = make_net(tmp_path, net_text(batch=4))
    with pytest.raises(DataError, match=r"f1\.h5 has no dataset 'label'"):
        net.forward()


def test_row_shape_change_in_a_later_file_is_a_data_error(tmp_path, files):
    with h5py.File(tmp_path / "f1.h5", "w") as f:
        f["data"] = np.zeros((1, 3, 3), np.float32)
        f["label"] = np.zeros((1, 1), np.float32)
    net = make_net(tmp_path, net_text(batch=4))
    with pytest.raises(DataError, match=r"f1\.h5: dataset 'data' has rows of shape \(3, 3\).*\(2, 3\)"):
        net.forward()


def test_datasets_with_different_row_counts(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["data"] = np.zeros((3, 2), np.float32)
        f["label"] = np.zeros((2,), np.float32)
    (tmp_path / "list.txt").write_text("f.h5")
    with pytest.raises(sc.NetBuildError, match="different numbers of rows.*data 3, label 2"):
        make_net(tmp_path, net_text())


def test_not_an_hdf5_file(tmp_path):
    (tmp_path / "f.h5").write_bytes(b"not hdf5 at all" * 10)
    (tmp_path / "list.txt").write_text("f.h5")
    with pytest.raises(sc.NetBuildError, match=r"cannot read HDF5 file .*f\.h5"):
        make_net(tmp_path, net_text())


def test_string_dataset_is_refused(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["data"] = np.array([b"a", b"b"])
    (tmp_path / "list.txt").write_text("f.h5")
    with pytest.raises(sc.NetBuildError, match="expected floating-point or integer"):
        make_net(tmp_path, net_text(tops=("data",)))


def test_empty_list(tmp_path):
    (tmp_path / "list.txt").write_text("\n\n")
    with pytest.raises(sc.NetBuildError, match="lists no HDF5 files"):
        make_net(tmp_path, net_text())


def test_missing_h5py_names_the_extra(tmp_path, files, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(sc.NetBuildError, match=r"needs the Python package 'h5py'.*"
                                               r"pip install segaware-caffe\[data\]"):
        make_net(tmp_path, net_text())


# ------------------------------------------------------------------ HDF5Output
def output_net(tmp_path, shapes=((2, 3, 2, 2), (2,)), file_name="out.h5", extra_layers=""):
    inputs = "".join(f'input: "{n}" input_shape {{ {" ".join(f"dim: {d}" for d in s)} }} '
                     for n, s in zip(("x", "label"), shapes))
    return (f'name: "w" {inputs} {extra_layers} layer {{ name: "out" type: "HDF5Output" '
            f'bottom: "x" bottom: "label" hdf5_output_param {{ file_name: "{file_name}" }} }}')


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def test_output_writes_4d_datasets_and_rewrites_each_forward(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = sc.Net(output_net(tmp_path, shapes=((2, 5), (2,))))
    assert not (tmp_path / "out.h5").exists()     # nothing is written before the first forward
    rng = np.random.default_rng(0)
    for _ in range(2):
        x, label = rng.standard_normal((2, 5)).astype(np.float32), np.array([1, 3], np.float32)
        assert net.forward(x=x, label=label) == {}
        written = read_all(tmp_path / "out.h5")      # complete after every forward
        assert set(written) == {"data", "label"}
        assert written["data"].dtype == np.float32
        np.testing.assert_array_equal(written["data"], x.reshape(2, 5, 1, 1))
        np.testing.assert_array_equal(written["label"], label.reshape(2, 1, 1, 1))


def test_output_in_a_float64_net_writes_float64(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = sc.Net(output_net(tmp_path), dtype=torch.float64)
    x = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    net.forward(x=x, label=torch.ones(2, dtype=torch.float64))
    written = read_all(tmp_path / "out.h5")
    assert written["data"].dtype == np.float64
    np.testing.assert_array_equal(written["data"], x.numpy())


def test_output_never_overwrites_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.h5").write_bytes(b"precious")
    with pytest.raises(sc.NetBuildError, match=r"out \(HDF5Output\): out\.h5 already exists.*overwrite=True"):
        sc.Net(output_net(tmp_path))
    assert (tmp_path / "out.h5").read_bytes() == b"precious"
    net = sc.Net(output_net(tmp_path), overwrite=True)
    net.forward(x=torch.zeros(2, 3, 2, 2), label=torch.zeros(2))
    assert read_all(tmp_path / "out.h5")["label"].shape == (2, 1, 1, 1)


def test_output_file_is_claimed_where_the_net_was_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = sc.Net(output_net(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    net.forward(x=torch.zeros(2, 3, 2, 2), label=torch.zeros(2))
    assert (tmp_path / "out.h5").exists() and not (tmp_path / "elsewhere" / "out.h5").exists()


@pytest.mark.parametrize("shapes, message", [
    (((2, 3), (3,)), "same number of items, got 2 and 3"),
    (((2, 3, 1, 1, 1), (2,)), "has 5 axes"),
])
def test_output_shape_errors(tmp_path, monkeypatch, shapes, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(sc.NetBuildError, match=message):
        sc.Net(output_net(tmp_path, shapes=shapes))


def test_output_missing_directory_warns_then_fails_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="output directory 'sub' does not exist"):
        net = sc.Net(output_net(tmp_path, file_name="sub/out.h5"))
    with pytest.raises(DataError, match=r"cannot write HDF5 file .*sub/out\.h5"):
        net.forward(x=torch.zeros(2, 3, 2, 2), label=torch.zeros(2))


def test_output_beside_a_training_branch_takes_no_gradient(tmp_path, monkeypatch):
    # the writer has no backward in the original; training the layer that feeds it still works
    monkeypatch.chdir(tmp_path)
    text = """name: "w"
    input: "x0" input_shape { dim: 2 dim: 3 dim: 2 dim: 2 }
    input: "t" input_shape { dim: 2 dim: 3 dim: 2 dim: 2 }
    input: "label" input_shape { dim: 2 }
    layer { name: "s" type: "Scale" bottom: "x0" top: "x"
            scale_param { filler { type: "constant" value: 2 } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t" top: "loss" }
    layer { name: "out" type: "HDF5Output" bottom: "x" bottom: "label"
            hdf5_output_param { file_name: "out.h5" } }"""
    net = sc.Net(text)
    out = net.forward(x0=torch.ones(2, 3, 2, 2), t=torch.zeros(2, 3, 2, 2), label=torch.zeros(2))
    net.loss(out).backward()
    # loss = sum((s x)^2) / (2 N): d/ds_c = sum over items and pixels of s x^2 / N = 2 * 8 / 2
    np.testing.assert_allclose(net.params["s"][0].grad.numpy(), [8.0, 8.0, 8.0])
    np.testing.assert_array_equal(read_all(tmp_path / "out.h5")["data"], np.full((2, 3, 2, 2), 2.0))
