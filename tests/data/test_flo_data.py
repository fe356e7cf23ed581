"""FloData: .flo files (read against bytes built here from the Middlebury definition), list tokens,
batches that wrap around the list, shuffle, and errors naming the file."""
import struct

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.data import DataError, WORKERS_ENV
from segaware_caffe.data.flo import read_flo, write_flo


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "0")


def flo_bytes(u, v):
    """The Middlebury layout: tag, width, height, then u, v interleaved row by row."""
    height, width = u.shape
    body = b"".join(struct.pack("<ff", float(u[y, x]), float(v[y, x]))
                    for y in range(height) for x in range(width))
    return struct.pack("<fii", 202021.25, width, height) + body


@pytest.fixture
def flows(tmp_path):
    rng = np.random.default_rng(0)
    fields = [rng.standard_normal((2, 3, 5)).astype(np.float32) * 4 for _ in range(3)]
    (tmp_path / "flo").mkdir()
    for i, f in enumerate(fields):
        (tmp_path / "flo" / f"f{i}.flo").write_bytes(flo_bytes(f[0], f[1]))
    # tokens, not lines: two names on one line, blank lines between
    (tmp_path / "list.txt").write_text("f0.flo f1.flo\n\n  f2.flo\n")
    return fields


def flo_net(tmp_path, batch=2, extra=""):
    path = tmp_path / "net.prototxt"
    path.write_text(f'name: "f" layer {{ name: "flo" type: "FloData" top: "flow" image_data_param '
                    f'{{ source: "list.txt" root_folder: "flo/" batch_size: {batch} {extra} }} }}')
    return sc.Net(path)


def test_read_flo_matches_the_definition(tmp_path):
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal((2, 4, 7)).astype(np.float32)
    (tmp_path / "a.flo").write_bytes(flo_bytes(u, v))
    flow = read_flo(tmp_path / "a.flo")
    assert flow.shape == (2, 4, 7) and flow.dtype == np.float32
    np.testing.assert_array_equal(flow[0], u)
    np.testing.assert_array_equal(flow[1], v)
    write_flo(tmp_path / "b.flo", flow)
    assert (tmp_path / "b.flo").read_bytes() == (tmp_path / "a.flo").read_bytes()


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_batches_in_list_order_wrap_around(tmp_path, flows, batch):
    net = flo_net(tmp_path, batch=batch)
    assert net.blob_shapes == {"flow": (batch, 2, 3, 5)}
    for b in range(3):
        want = np.stack([flows[(b * batch + i) % 3] for i in range(batch)])
        np.testing.assert_array_equal(net.forward()["flow"].numpy(), want)


def test_shuffle_reshuffles_each_pass_and_follows_torch_seed(tmp_path, flows):
    def passes():
        torch.manual_seed(7)
        net = flo_net(tmp_path, batch=3, extra="shuffle: true")
        return [net.forward()["flow"].numpy() for _ in range(4)]

    first = passes()
    for batch in first:
        order = [next(i for i, f in enumerate(flows) if np.array_equal(item, f)) for item in batch]
        assert sorted(order) == [0, 1, 2]
    assert any(not np.array_equal(a, first[0]) for a in first[1:])
    for a, b in zip(first, passes()):
        np.testing.assert_array_equal(a, b)


def test_corrupt_files_name_the_file(tmp_path):
    (tmp_path / "tag.flo").write_bytes(struct.pack("<fii", 1.0, 2, 2) + b"\0" * 32)
    with pytest.raises(DataError, match=r"tag\.flo: not a \.flo file .*202021\.25"):
        read_flo(tmp_path / "tag.flo")
    (tmp_path / "short.flo").write_bytes(struct.pack("<fii", 202021.25, 3, 2) + b"\0" * 20)
    with pytest.raises(DataError, match=r"short\.flo: truncated \.flo file: 5 of 12 flow values"):
        read_flo(tmp_path / "short.flo")
    (tmp_path / "size.flo").write_bytes(struct.pack("<fii", 202021.25, -3, 2))
    with pytest.raises(DataError, match="corrupt .flo header: width -3"):
        read_flo(tmp_path / "size.flo")
    (tmp_path / "tiny.flo").write_bytes(b"PIEH")
    with pytest.raises(DataError, match="only 4 bytes"):
        read_flo(tmp_path / "tiny.flo")


def test_corrupt_first_file_is_a_build_error_later_one_a_data_error(tmp_path, flows):
    good = (tmp_path / "flo" / "f1.flo").read_bytes()
    (tmp_path / "flo" / "f1.flo").write_bytes(good[:-4])
    net = flo_net(tmp_path, batch=2)
    with pytest.raises(DataError, match=r"flo \(FloData\): .*f1\.flo: truncated"):
        net.forward()
    (tmp_path / "flo" / "f0.flo").write_bytes(b"junk" * 8)
    with pytest.raises(DataError, match=r"flo \(FloData\): .*f0\.flo: not a \.flo file"):
        flo_net(tmp_path)


def test_missing_file_and_sizes_that_differ(tmp_path, flows):
    write_flo(tmp_path / "flo" / "f1.flo", np.zeros((2, 4, 5), np.float32), overwrite=True)
    with pytest.raises(DataError, match="items of one batch have different sizes"):
        flo_net(tmp_path, batch=2).forward()
    (tmp_path / "flo" / "f0.flo").unlink()
    with pytest.raises(sc.NetBuildError, match=r"cannot read .*f0\.flo"):
        flo_net(tmp_path)


def test_empty_list(tmp_path):
    (tmp_path / "list.txt").write_text("\n")
    with pytest.raises(sc.NetBuildError, match="names no .flo files"):
        flo_net(tmp_path)
