"""Minimal readers/writers (bootstrap; the full API with templates, upgrades and errors lands in
caffe_proto issue #2)."""
import os
import re

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from . import caffe_pb2
from .errors import CaffeFormatError


def _read_text(path_or_text):
    if isinstance(path_or_text, (bytes, bytearray)):
        return path_or_text.decode(), "<bytes>"
    if isinstance(path_or_text, os.PathLike) or ("\n" not in path_or_text and os.path.exists(path_or_text)):
        with open(path_or_text) as f:
            return f.read(), os.fspath(path_or_text)
    return path_or_text, "<text>"


def _substitute(text, variables, where):
    variables = {k: str(v) for k, v in (variables or {}).items()}
    missing = sorted({m for m in re.findall(r"\$\{(\w+)\}", text) if m not in variables})
    if missing:
        raise CaffeFormatError(f"{where}: unresolved template variables: {', '.join(missing)}")
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], text)


def _parse_text(path_or_text, message, variables):
    text, where = _read_text(path_or_text)
    text = _substitute(text, variables, where)
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise CaffeFormatError(f"{where}: {e}") from None
    return message


def read_net(path_or_text, variables=None):
    return _parse_text(path_or_text, caffe_pb2.NetParameter(), variables)


def read_solver(path_or_text, variables=None):
    return _parse_text(path_or_text, caffe_pb2.SolverParameter(), variables)


def _read_binary(path_or_bytes, message):
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data, where = bytes(path_or_bytes), "<bytes>"
    else:
        where = os.fspath(path_or_bytes)
        with open(where, "rb") as f:
            data = f.read()
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise CaffeFormatError(f"{where}: not a valid {message.DESCRIPTOR.name} ({e})") from None
    return message


def read_weights(path_or_bytes):
    return _read_binary(path_or_bytes, caffe_pb2.NetParameter())


def write_weights(net_param, path):
    with open(path, "wb") as f:
        f.write(net_param.SerializeToString())


def read_blob(path_or_bytes):
    return blob_to_array(_read_binary(path_or_bytes, caffe_pb2.BlobProto()))


def write_blob(array, path):
    with open(path, "wb") as f:
        f.write(array_to_blob(array).SerializeToString())


def read_solverstate(path_or_bytes):
    return _read_binary(path_or_bytes, caffe_pb2.SolverState())


def write_solverstate(state, path):
    with open(path, "wb") as f:
        f.write(state.SerializeToString())


def blob_shape(blob):
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    legacy = ("num", "channels", "height", "width")
    if any(blob.HasField(f) for f in legacy):
        return tuple(int(getattr(blob, f)) for f in legacy)
    return ()  # Caffe writes no shape at all for a 0-axis (scalar) blob


def blob_to_array(blob):
    shape = blob_shape(blob)
    if len(blob.double_data):
        arr = np.asarray(blob.double_data, dtype=np.float64)
    else:
        arr = np.asarray(blob.data, dtype=np.float32)
    return arr.reshape(shape)


def array_to_blob(array, diff=None):
    array = np.asarray(array)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(array.shape)
    blob.data.extend(array.astype(np.float32).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float32).ravel().tolist())
    return blob
