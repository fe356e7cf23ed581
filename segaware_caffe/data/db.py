"""LMDB and LevelDB databases of Datum records (the Data layer): records in key order, wrapping
around, and Datum decoding. lmdb and plyvel are imported on first use.

A database is opened read-only, without LMDB's lock file (nothing is written next to it). The net's
build peeks at the first record and closes the database again; the reading itself happens where
the data loader runs (its worker process, or the main process). Readers of one database in one
process share its handle (LMDB and LevelDB both refuse a second one); LevelDB also allows only
one process at a time."""
import contextlib
import os
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from segaware_caffe.caffe_proto import caffe_pb2

from .images import DataError, decode_image_bytes
from .optional import require

BACKENDS = ("LMDB", "LEVELDB")


def _key_text(key):
    try:
        return repr(key.decode("ascii"))
    except UnicodeDecodeError:
        return repr(key)


# Databases open in this process, shared by every reader of one path: LMDB and LevelDB each
# refuse a second handle on a database within one process. realpath -> [handle, readers].
# A worker process forked while a handle is open inherits it and reads through it.
_OPEN = {}


@contextlib.contextmanager
def _shared(path, open_handle):
    key = os.path.realpath(path)
    entry = _OPEN.get(key)
    if entry is None:
        entry = _OPEN[key] = [open_handle(), 0]
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] == 0 and _OPEN.get(key) is entry:
            del _OPEN[key]
            entry[0].close()


def _open_lmdb(path, label):
    lmdb = require("lmdb", label)
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        hint = (" (it looks like a LevelDB database: set data_param { backend: LEVELDB })"
                if os.path.isfile(os.path.join(path, "CURRENT")) else "")
        raise DataError(f"{label}: {path} is not an LMDB database: it has no data.mdb{hint}")
    try:
        return lmdb.open(path, readonly=True, lock=False, subdir=True)
    except lmdb.Error as e:
        raise DataError(f"{label}: cannot open LMDB database {path}: {e}") from None


def _lmdb_records(path, label):
    with _shared(path, lambda: _open_lmdb(path, label)) as env, env.begin(buffers=False) as txn:
        cursor = txn.cursor()
        if not cursor.first():
            raise DataError(f"{label}: LMDB database {path} has no records")
        while True:
            yield cursor.key(), cursor.value()
            if not cursor.next():
                cursor.first()


def _open_leveldb(path, label):
    plyvel = require("plyvel", label)
    try:
        return plyvel.DB(path, create_if_missing=False)
    except (plyvel.Error, OSError) as e:
        hint = ""
        if os.path.isfile(os.path.join(path, "data.mdb")):
            hint = " (it looks like an LMDB database: set data_param { backend: LMDB })"
        elif "lock" in str(e).lower():
            hint = (" (LevelDB lets one process at a time open a database; another process holds "
                    "it. Set SEGAWARE_DATA_WORKERS=0 to read in the main process)")
        raise DataError(f"{label}: cannot open LevelDB database {path}: {e}{hint}") from None


def _leveldb_records(path, label):
    with _shared(path, lambda: _open_leveldb(path, label)) as db:
        while True:
            count = 0
            with db.iterator() as iterator:
                for key, value in iterator:
                    count += 1
                    yield key, value
            if not count:
                raise DataError(f"{label}: LevelDB database {path} has no records")


def records(path, backend, label):
    """(key, value) of every record in key order, again and again (Caffe's cursor restarts at
    the first record after the last). Raises DataError for a database that cannot be opened or
    has no records."""
    if backend == "LMDB":
        return _lmdb_records(path, label)
    if backend == "LEVELDB":
        return _leveldb_records(path, label)
    raise ValueError(f"{label}: unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")


def first_record(path, backend, label):
    """The first (key, value) of the database; the database is closed again."""
    stream = records(path, backend, label)
    try:
        return next(stream)
    finally:
        stream.close()


@dataclass(frozen=True)
class DecodedDatum:
    image: np.ndarray      # H x W x C, uint8 (data bytes, encoded images) or float32 (float_data)
    label: int


def decode_datum(value, where, color=None):
    """A Datum record as an image in OpenCV's H x W x C layout (channels as stored: BGR for
    images Caffe's tools wrote) and its label. Encoded records are decoded like cv::imdecode:
    color None keeps the stored channels, True gives 3 (BGR), False 1 (transform_param
    force_color / force_gray). Raises DataError naming `where` (the database and key)."""
    try:
        datum = caffe_pb2.Datum.FromString(value)
    except DecodeError as e:
        raise DataError(f"{where}: not a Datum record ({e})") from None
    if datum.encoded:
        mode = "native" if color is None else ("color" if color else "gray")
        try:
            image = decode_image_bytes(datum.data, mode)
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: encoded Datum does not decode as an image: {e}") from None
        return DecodedDatum(image, int(datum.label))
    shape = (int(datum.channels), int(datum.height), int(datum.width))
    if min(shape) <= 0:
        raise DataError(f"{where}: Datum has channels/height/width {shape}; expected positive "
                        f"sizes")
    count = shape[0] * shape[1] * shape[2]
    if len(datum.data):
        if len(datum.data) != count:
            raise DataError(f"{where}: Datum holds {len(datum.data)} data bytes, expected "
                            f"channels*height*width = {count}")
        chw = np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    elif len(datum.float_data):
        if len(datum.float_data) != count:
            raise DataError(f"{where}: Datum holds {len(datum.float_data)} float_data values, "
                            f"expected channels*height*width = {count}")
        chw = np.asarray(datum.float_data, dtype=np.float32).reshape(shape)
    else:
        raise DataError(f"{where}: Datum holds neither data bytes nor float_data")
    return DecodedDatum(np.ascontiguousarray(chw.transpose(1, 2, 0)), int(datum.label))


def record_where(label, path, key):
    return f"{label}: database {path}, record {_key_text(key)}"
