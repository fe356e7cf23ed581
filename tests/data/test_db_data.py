"""Data on LMDB and LevelDB databases written by the test: raw, float and encoded Datums, the
DataTransformer (TEST centre crop, TRAIN random crop, mirror, mean values and mean file, scale),
key order and wrap-around, and errors naming the database and record."""
import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import segaware_caffe as sc
from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.data import DataError, WORKERS_ENV
from segaware_caffe.data.images import decode_image_bytes

lmdb = pytest.importorskip("lmdb", reason="Data on LMDB needs lmdb (pip install segaware-caffe[data])")
plyvel = pytest.importorskip("plyvel", reason="Data on LevelDB needs plyvel (pip install segaware-caffe[data])")

BACKENDS = ["LMDB", "LEVELDB"]


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "0")


def raw_datum(chw, label):
    c, h, w = chw.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=chw.astype(np.uint8).tobytes(),
                           label=label).SerializeToString()


def float_datum(chw, label):
    c, h, w = chw.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, float_data=chw.ravel().tolist(),
                           label=label).SerializeToString()


def encoded_datum(image, label, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return caffe_pb2.Datum(data=buffer.getvalue(), encoded=True, label=label).SerializeToString()


def write_db(path, backend, records):
    """records: {key bytes: value bytes}, written in a shuffled order (they are read by key)."""
    items = list(records.items())
    np.random.default_rng(1).shuffle(items)
    if backend == "LMDB":
        env = lmdb.open(str(path), map_size=1 << 26)
        with env.begin(write=True) as txn:
            for key, value in items:
                txn.put(key, value)
        env.close()
    else:
        db = plyvel.DB(str(path), create_if_missing=True)
        for key, value in items:
            db.put(key, value)
        db.close()
    return path


def images(count, shape=(3, 7, 9), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def raw_db(tmp_path, backend, count=5, shape=(3, 7, 9)):
    chws = images(count, shape)
    write_db(tmp_path / "db", backend, {f"{i:08d}".encode(): raw_datum(c, 10 + i)
                                         for i, c in enumerate(chws)})
    return chws


def data_net(tmp_path, backend, batch=3, transform="", tops=("data", "label"), phase="test",
             extra="", **kwargs):
    top_text = " ".join(f'top: "{t}"' for t in tops)
    path = tmp_path / "net.prototxt"
    path.write_text(f'name: "d" layer {{ name: "db" type: "Data" {top_text} '
                    f'data_param {{ source: "db" backend: {backend} batch_size: {batch} {extra} }} '
                    f'transform_param {{ {transform} }} }}')
    return sc.Net(path, phase=phase, **kwargs)


def centre(chw, crop):
    _, h, w = chw.shape
    top, left = (h - crop) // 2, (w - crop) // 2
    return chw[:, top:top + crop, left:left + crop]


@pytest.mark.parametrize("backend", BACKENDS)
def test_test_phase_centre_crop_mean_scale_key_order_and_wrap(tmp_path, backend):
    chws = raw_db(tmp_path, backend, count=5)
    mean = np.float32([100.5, 120, 140.25])
    net = data_net(tmp_path, backend, batch=3,
                   transform="scale: 0.25 crop_size: 4 mean_value: 100.5 mean_value: 120 mean_value: 140.25")
    assert net.blob_shapes == {"data": (3, 3, 4, 4), "label": (3,)}
    order = [0, 1, 2, 3, 4, 0, 1, 2, 3]
    for b in range(3):
        out = net.forward()
        picked = order[3 * b:3 * b + 3]
        want = np.stack([(centre(chws[i], 4).astype(np.float32) - mean[:, None, None])
                         * np.float32(0.25) for i in picked])
        np.testing.assert_array_equal(out["data"].numpy(), want)
        np.testing.assert_array_equal(out["label"].numpy(), [10 + i for i in picked])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_crop_single_mean_and_data_top_only(tmp_path, backend):
    chws = raw_db(tmp_path, backend, count=2, shape=(2, 5, 6))
    net = data_net(tmp_path, backend, batch=2, transform="mean_value: 3", tops=("data",))
    out = net.forward()
    assert list(out) == ["data"]
    np.testing.assert_array_equal(out["data"].numpy(), np.stack(chws).astype(np.float32) - 3)


def test_float_data_records(tmp_path):
    rng = np.random.default_rng(4)
    chws = [rng.standard_normal((1, 5, 5)).astype(np.float32) for _ in range(2)]
    write_db(tmp_path / "db", "LMDB", {b"a": float_datum(chws[0], 1), b"b": float_datum(chws[1], 2)})
    net = data_net(tmp_path, "LMDB", batch=2, transform="crop_size: 3 scale: 2")
    np.testing.assert_array_equal(net.forward()["data"].numpy(),
                                  np.stack([centre(c, 3) * np.float32(2) for c in chws]))


def test_mean_file_is_cropped_at_the_same_place(tmp_path):
    chws = raw_db(tmp_path, "LMDB", count=3)
    mean = np.random.default_rng(2).uniform(0, 255, (1, 3, 7, 9)).astype(np.float32)
    caffe_proto.write_blob(mean, tmp_path / "mean.binaryproto")
    net = data_net(tmp_path, "LMDB", batch=3, transform='crop_size: 5 mean_file: "mean.binaryproto"')
    want = np.stack([centre(c.astype(np.float32) - mean[0], 5) for c in chws])
    np.testing.assert_array_equal(net.forward()["data"].numpy(), want)


def test_train_random_crop_and_mirror(tmp_path):
    chws = raw_db(tmp_path, "LMDB", count=4, shape=(3, 9, 11))
    torch.manual_seed(0)
    net = data_net(tmp_path, "LMDB", batch=4, transform="crop_size: 5 mirror: true", phase="train")
    seen_offsets, seen_mirror = set(), set()
    for _ in range(6):
        for item, chw in zip(net.forward()["data"].numpy(), chws):
            matches = [(top, left, flip) for top in range(5) for left in range(7) for flip in (0, 1)
                       if np.array_equal(item, (chw[:, top:top + 5, left:left + 5][:, :, ::-1] if flip
                                                else chw[:, top:top + 5, left:left + 5]))]
            assert matches, "every item is a crop (possibly mirrored) of its record"
            seen_offsets.add(matches[0][:2])
            seen_mirror.add(matches[0][2])
    assert len(seen_offsets) > 5 and seen_mirror == {0, 1}
    torch.manual_seed(0)
    again = data_net(tmp_path, "LMDB", batch=4, transform="crop_size: 5 mirror: true", phase="train")
    torch.manual_seed(0)
    first = data_net(tmp_path, "LMDB", batch=4, transform="crop_size: 5 mirror: true", phase="train")
    np.testing.assert_array_equal(again.forward()["data"].numpy(), first.forward()["data"].numpy())


def test_test_phase_mirror_only_flips(tmp_path):
    chws = raw_db(tmp_path, "LMDB", count=4, shape=(1, 4, 6))
    net = data_net(tmp_path, "LMDB", batch=4, transform="mirror: true")
    flips = set()
    for _ in range(4):
        for item, chw in zip(net.forward()["data"].numpy(), chws):
            if np.array_equal(item, chw):
                flips.add(0)
            else:
                np.testing.assert_array_equal(item, chw[:, :, ::-1])
                flips.add(1)
    assert flips == {0, 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoded_png_records_decode_bgr(tmp_path, backend):
    rng = np.random.default_rng(3)
    rgbs = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(2)]
    write_db(tmp_path / "db", backend, {f"{i}".encode(): encoded_datum(Image.fromarray(r), i)
                                         for i, r in enumerate(rgbs)})
    net = data_net(tmp_path, backend, batch=2, transform="crop_size: 4")
    want = np.stack([centre(r[:, :, ::-1].transpose(2, 0, 1), 4) for r in rgbs]).astype(np.float32)
    np.testing.assert_array_equal(net.forward()["data"].numpy(), want)


def test_encoded_gray_keeps_one_channel_and_force_color_or_gray(tmp_path):
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (5, 5), dtype=np.uint8)
    write_db(tmp_path / "db", "LMDB", {b"k": encoded_datum(Image.fromarray(gray), 0)})
    native = data_net(tmp_path, "LMDB", batch=1)
    np.testing.assert_array_equal(native.forward()["data"].numpy(), gray[None, None].astype(np.float32))
    color = data_net(tmp_path, "LMDB", batch=1, transform="force_color: true")
    np.testing.assert_array_equal(color.forward()["data"].numpy(),
                                  np.repeat(gray[None, None], 3, axis=1).astype(np.float32))
    with pytest.raises(sc.NetBuildError, match="both force_color and force_gray"):
        data_net(tmp_path, "LMDB", batch=1, transform="force_color: true force_gray: true")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "RGB"])
def test_png_decoding_matches_opencv_imdecode(mode):
    cv2 = pytest.importorskip("cv2", reason="the comparison with cv::imdecode needs opencv-python")
    rng = np.random.default_rng(6)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).convert("P")
    else:
        channels = {"RGBA": 4, "L": 1, "LA": 2, "RGB": 3}[mode]
        image = Image.fromarray(rng.integers(0, 256, (6, 7, channels), dtype=np.uint8).squeeze(), mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = np.frombuffer(buffer.getvalue(), np.uint8)
    for flag, ours in ((cv2.IMREAD_UNCHANGED, "native"), (cv2.IMREAD_COLOR, "color"),
                       (cv2.IMREAD_GRAYSCALE, "gray")):
        ref = cv2.imdecode(data, flag)
        ref = ref[:, :, None] if ref.ndim == 2 else ref
        got = decode_image_bytes(buffer.getvalue(), ours)
        assert got.shape == ref.shape, (mode, ours)
        if ours != "gray" or mode in ("L", "LA"):      # colour-to-gray rounding may differ by 1
            np.testing.assert_array_equal(got, ref)
        else:
            assert np.abs(got.astype(int) - ref).max() <= 1


def test_worker_process_gives_the_same_batches(tmp_path, monkeypatch):
    chws = raw_db(tmp_path, "LEVELDB", count=4)
    monkeypatch.setenv(WORKERS_ENV, "2")
    net = data_net(tmp_path, "LEVELDB", batch=3)
    assert net.layers["db"].stream.loader.num_workers == 1   # LevelDB: one reader process
    got = np.concatenate([net.forward()["label"].numpy() for _ in range(3)])
    np.testing.assert_array_equal(got, [10 + i % 4 for i in range(9)])
    net.layers["db"].close()
    assert chws


def test_follows_net_dtype(tmp_path):
    chws = raw_db(tmp_path, "LMDB", count=1)
    out = data_net(tmp_path, "LMDB", batch=1, dtype=torch.float64).forward()
    assert out["data"].dtype == torch.float64
    np.testing.assert_array_equal(out["data"].numpy()[0], chws[0])


def test_ignored_fields_warn(tmp_path):
    raw_db(tmp_path, "LMDB", count=1)
    with pytest.warns(UserWarning, match=r"data_param.rand_skip is ignored"):
        data_net(tmp_path, "LMDB", batch=1, extra="rand_skip: 3")
    with pytest.warns(UserWarning, match=r"data_param.crop_size is ignored.*transform_param"):
        data_net(tmp_path, "LMDB", batch=1, extra="crop_size: 3")


# ------------------------------------------------------------------ errors
def test_empty_lmdb(tmp_path):
    write_db(tmp_path / "db", "LMDB", {})
    with pytest.raises(DataError, match=r"db \(Data\): LMDB database .*db has no records") as error:
        data_net(tmp_path, "LMDB")
    assert isinstance(error.value, sc.NetBuildError)     # found while building: both
    with pytest.raises(sc.NetBuildError, match="has no records"):
        data_net(tmp_path, "LMDB")


def test_empty_leveldb(tmp_path):
    write_db(tmp_path / "db", "LEVELDB", {})
    with pytest.raises(sc.NetBuildError, match=r"LevelDB database .*db has no records"):
        data_net(tmp_path, "LEVELDB")


@pytest.mark.parametrize("written, asked, hint", [("LMDB", "LEVELDB", "backend: LMDB"),
                                                   ("LEVELDB", "LMDB", "backend: LEVELDB")])
def test_wrong_backend_says_which(tmp_path, written, asked, hint):
    raw_db(tmp_path, written, count=1)
    with pytest.raises(sc.NetBuildError, match=hint):
        data_net(tmp_path, asked)


def test_missing_source_and_file_source(tmp_path):
    with pytest.raises(sc.NetBuildError, match=r"data_param.source 'db' not found"):
        data_net(tmp_path, "LMDB")
    (tmp_path / "db").write_text("x")
    with pytest.raises(sc.NetBuildError, match="is a file; expected a database directory"):
        data_net(tmp_path, "LMDB")


def test_first_record_not_a_datum_names_the_key(tmp_path):
    write_db(tmp_path / "db", "LMDB", {b"key0": b"\xff\xff\xff garbage"})
    with pytest.raises(DataError, match=r"record 'key0': not a Datum record"):
        data_net(tmp_path, "LMDB")


def test_later_record_that_does_not_decode_is_a_data_error(tmp_path):
    good = raw_datum(images(1)[0], 0)
    bad_image = caffe_pb2.Datum(data=b"not a png", encoded=True).SerializeToString()
    write_db(tmp_path / "db", "LMDB", {b"a": good, b"b": bad_image})
    net = data_net(tmp_path, "LMDB", batch=2)
    with pytest.raises(DataError, match=r"database .*db, record 'b': encoded Datum does not decode"):
        net.forward()


@pytest.mark.parametrize("datum, message", [
    (caffe_pb2.Datum(channels=3, height=2, width=2, data=b"\0" * 5), "holds 5 data bytes, expected"),
    (caffe_pb2.Datum(channels=1, height=2, width=2, float_data=[1.0]), "1 float_data values"),
    (caffe_pb2.Datum(channels=1, height=2, width=2), "neither data bytes nor float_data"),
    (caffe_pb2.Datum(channels=0, height=2, width=2, data=b""), "expected positive sizes"),
])
def test_malformed_raw_datums(tmp_path, datum, message):
    write_db(tmp_path / "db", "LMDB", {b"r": datum.SerializeToString()})
    with pytest.raises(sc.NetBuildError, match=message):
        data_net(tmp_path, "LMDB")


def test_transform_settings_checked_against_the_first_record(tmp_path):
    raw_db(tmp_path, "LMDB", count=1, shape=(3, 4, 6))
    with pytest.raises(sc.NetBuildError, match=r"crop_size 5 is larger than the first record's image \(4x6"):
        data_net(tmp_path, "LMDB", transform="crop_size: 5")
    with pytest.raises(sc.NetBuildError, match="2 mean_value entries for 3-channel records"):
        data_net(tmp_path, "LMDB", transform="mean_value: 1 mean_value: 2")
    caffe_proto.write_blob(np.zeros((1, 3, 5, 6), np.float32), tmp_path / "mean.binaryproto")
    with pytest.raises(sc.NetBuildError, match=r"mean_file .* shape \(3, 5, 6\); the records are \(3, 4, 6\)"):
        data_net(tmp_path, "LMDB", transform='mean_file: "mean.binaryproto"')
    with pytest.raises(sc.NetBuildError, match="batch_size must be > 0"):
        data_net(tmp_path, "LMDB", batch=0)


def test_records_of_different_sizes_in_one_batch(tmp_path):
    write_db(tmp_path / "db", "LMDB", {b"a": raw_datum(images(1, (3, 4, 4))[0], 0),
                                       b"b": raw_datum(images(1, (3, 5, 4))[0], 0)})
    net = data_net(tmp_path, "LMDB", batch=2)
    with pytest.raises(DataError, match="items of one batch have different sizes"):
        net.forward()


def test_a_later_record_smaller_than_the_crop(tmp_path):
    write_db(tmp_path / "db", "LMDB", {b"a": raw_datum(images(1, (3, 6, 6))[0], 0),
                                       b"b": raw_datum(images(1, (3, 3, 6))[0], 0)})
    net = data_net(tmp_path, "LMDB", batch=2, transform="crop_size: 4")
    with pytest.raises(DataError, match=r"record 'b': the image is 3x6, smaller than crop_size 4"):
        net.forward()


@pytest.mark.parametrize("backend, module", [("LMDB", "lmdb"), ("LEVELDB", "plyvel")])
def test_missing_package_names_the_extra(tmp_path, monkeypatch, backend, module):
    raw_db(tmp_path, backend, count=1)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(sc.NetBuildError, match=rf"needs the Python package '{module}'.*"
                                               r"pip install segaware-caffe\[data\]"):
        data_net(tmp_path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_nets_read_one_database_in_one_process(tmp_path, backend):
    raw_db(tmp_path, backend, count=3)
    (tmp_path / "db" / "lock.mdb").unlink(missing_ok=True)
    first = data_net(tmp_path, backend, batch=2)
    second = data_net(tmp_path, backend, batch=2)
    np.testing.assert_array_equal(first.forward()["label"].numpy(), [10, 11])
    np.testing.assert_array_equal(second.forward()["label"].numpy(), [10, 11])
    np.testing.assert_array_equal(first.forward()["label"].numpy(), [12, 10])
    assert not (tmp_path / "db" / "lock.mdb").exists()     # read without writing a lock file


def test_solver_trains_from_an_lmdb(tmp_path, monkeypatch):
    """A train net reading its batches from the database, through the Solver (no inputs fed)."""
    raw_db(tmp_path, "LMDB", count=6, shape=(3, 5, 5))
    (tmp_path / "train.prototxt").write_text('''name: "t"
    layer { name: "db" type: "Data" top: "data" top: "label"
            data_param { source: "db" backend: LMDB batch_size: 3 } transform_param { scale: 0.01 } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.01 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }''')
    (tmp_path / "solver.prototxt").write_text('net: "train.prototxt" base_lr: 0.1 lr_policy: "fixed" '
                                              'max_iter: 4 snapshot_after_train: false display: 0')
    monkeypatch.chdir(tmp_path)
    solver = sc.Solver(tmp_path / "solver.prototxt")
    before = solver.net.params["ip"][0].detach().clone()
    solver.step(4)
    assert not torch.equal(before, solver.net.params["ip"][0].detach())
