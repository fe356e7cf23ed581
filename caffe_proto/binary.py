"""Binary side of Caffe files: decoding under the right dialect with errors that say where a file
breaks, BVLC/fork field-number clashes settled per layer type, and checked BlobProto <-> numpy
conversion."""
import functools
import os
import warnings

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from . import caffe_pb2
from .dialects import READ_ORDER, DialectError, from_dialect, layer_label
from .errors import CaffeFormatError
from .wire import (LEN, WireError, encode_len_field, expected_wire_types, is_repeated, iter_fields,
                   read_varint)

# LayerParameter numbers 143..148 mean different things in the fork and in BVLC Caffe. Ours keeps
# the fork's and gives BVLC's the number 1000 + n. Per number: the fork's field and the layer
# types that use it, BVLC's field (ours) and its layer types.
CLASHING_LAYER_FIELDS = {
    143: ("interp_param", {"Interp"}, "input_param", {"Input"}),
    144: ("seg_accuracy_param", {"SegAccuracy"}, "crop_param", {"Crop"}),
    145: ("mat_write_param", {"MatWrite"}, "parameter_param", {"Parameter"}),
    146: ("dense_crf_param", {"DenseCRF"}, "recurrent_param", {"Recurrent", "RNN", "LSTM"}),
    147: ("domain_transform_param", {"DomainTransform"}, "swish_param", {"Swish"}),
    148: ("adaptive_bias_channel_param", {"AdaptiveBiasChannel"}, "clip_param", {"Clip"}),
}

_LAYER_FIELD = caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name["layer"].number
_TYPE_FIELD = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name["type"].number


def read_bytes(path_or_bytes):
    """(data, where) from a path or bytes."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes), "<bytes>"
    where = os.fspath(path_or_bytes)
    try:
        with open(where, "rb") as f:
            return f.read(), where
    except FileNotFoundError:
        raise CaffeFormatError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise CaffeFormatError(f"{where}: is a directory, expected a binary file") from None


def _looks_like_text(data):
    head = data[:2048]
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return False
    return any(word in text for word in ("layer", "name:", "input:", "net:", "{"))


def parse_binary(data, message, where, what, dialect=None):
    """Parse bytes into `message` (in place); returns (message, dialect name, the bytes in our
    numbering). Each dialect of dialects.READ_ORDER is tried in turn (only `dialect` if given);
    when none decodes, the error says where the bytes break, and says "truncated" only when a
    length runs past the end of the data."""
    if not data:
        raise CaffeFormatError(f"{where}: empty file, expected a binary {what}")
    descriptor = message.DESCRIPTOR
    names = (dialect,) if dialect else READ_ORDER
    fitted = []           # (misfits, order, name, wire bytes, misfit places)
    for order, name in enumerate(names):
        try:
            wire, found = from_dialect(data, descriptor, name,
                                       check_candidates=() if dialect else READ_ORDER)
        except (WireError, DialectError):
            continue      # malformed whatever the dialect: diagnosed below
        if found:
            fitted.append((len(found), order, name, wire, found))
            continue
        try:
            message.Clear()
            message.ParseFromString(wire)
        except DecodeError:
            continue
        check_text_fields(message, where)
        return message, name, wire
    for count, _, name, wire, found in sorted(fitted, key=lambda t: t[:2]):
        try:
            message.Clear()
            message.ParseFromString(wire)
        except DecodeError:
            continue
        places = "; ".join(f"byte {offset}: {text}" for offset, text in found[:3])
        warnings.warn(f"{where}: no Caffe dialect ({', '.join(names)}) reads every field of this "
                      f"{what} as declared; read as {name} ({count} misfit(s): {places})",
                      stacklevel=3)
        check_text_fields(message, where)
        return message, name, wire
    message.Clear()
    if _looks_like_text(data):
        raise CaffeFormatError(
            f"{where}: this is a text file, not a binary {what} (read prototxt files with "
            f"read_net / read_solver)")
    raise diagnose(data, descriptor, where, what)


def diagnose(data, descriptor, where, what):
    """A CaffeFormatError saying where and how data fails to be a `descriptor` message."""
    problem = _first_break(memoryview(data), 0, len(data), descriptor, "")
    size = f"({len(data)} bytes)"
    if problem is None:       # the generated parser refused something the walk accepts
        return CaffeFormatError(f"{where}: not a valid binary {what}: the file is corrupt or is "
                                f"not a Caffe file {size}")
    error, message_descriptor, context = problem
    declared = message_descriptor.fields_by_number.get(error.number) \
        if error.number is not None else None
    fits = declared is not None and error.wire_type in expected_wire_types(declared)
    if error.past_end and (fits or error.number is None):
        field = f"{message_descriptor.name}.{declared.name}: " if declared is not None else ""
        return CaffeFormatError(f"{where}: not a valid binary {what}: the file is truncated: "
                                f"{context}{field}{error.problem} {size}")
    return CaffeFormatError(f"{where}: not a valid binary {what}: the file is corrupt or is not a "
                            f"Caffe file: {context}{message_descriptor.name}: {error.problem} "
                            f"{size}")


def _first_break(data, start, end, descriptor, context):
    """(WireError, message descriptor, layer context) of the first malformed place, or None."""
    layer_index = 0
    try:
        for f in iter_fields(data, start, end):
            declared = descriptor.fields_by_number.get(f.number)
            if (declared is None or declared.message_type is None or f.wire_type != LEN):
                continue
            sub_context = context
            if descriptor.full_name == "caffe.NetParameter" and declared.name in ("layer", "layers"):
                label = layer_label(data, f.value_start, f.end, declared.message_type, layer_index)
                sub_context = f"layer {label} (from byte {f.start}): "
                layer_index += 1
            found = _first_break(data, f.value_start, f.end, declared.message_type, sub_context)
            if found is not None:
                return found
    except WireError as error:
        if descriptor.full_name == "caffe.NetParameter" and error.number in (
                descriptor.fields_by_name["layer"].number, descriptor.fields_by_name["layers"].number):
            # a layer cut short: name it from what is left of it
            field_descriptor = descriptor.fields_by_number[error.number]
            try:
                _, payload = read_varint(data, error.offset, end)
                _, payload = read_varint(data, payload, end)
            except WireError:
                payload = end
            label = layer_label(data, payload, end, field_descriptor.message_type, layer_index)
            context = f"{context}layer {label} (from byte {error.offset}): "
        return error, descriptor, context
    return None


def _unknown_count(message):
    from google.protobuf import unknown_fields
    return len(unknown_fields.UnknownFieldSet(message))


_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


@functools.lru_cache(maxsize=None)
def _text_holders(root):
    """Full names of the message types reachable from `root` that can hold a string field
    (blobs and Datums, the bulk of a file, cannot: the check below never enters them)."""
    types, stack = {}, [root]
    while stack:
        descriptor = stack.pop()
        if descriptor.full_name not in types:
            types[descriptor.full_name] = descriptor
            stack.extend(f.message_type for f in descriptor.fields if f.type == _MESSAGE)
    holders = {name for name, d in types.items() if any(f.type == _STRING for f in d.fields)}
    grew = True
    while grew:
        grew = False
        for name, descriptor in types.items():
            if name not in holders and any(f.type == _MESSAGE and f.message_type.full_name in holders
                                           for f in descriptor.fields):
                holders.add(name)
                grew = True
    return frozenset(holders)


def _text(value):
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")


def check_text_fields(message, where):
    """protobuf hands out a string field whose bytes are not UTF-8 as `bytes` (proto2 does not
    check them while parsing); names, types and blob names must be text, so the first such
    field is a CaffeFormatError naming the file, the layer (index, name, type) and the field."""
    holders = _text_holders(message.DESCRIPTOR)

    def walk(message, layer, path):
        for field, value in message.ListFields():
            repeated = is_repeated(field)
            items = value if repeated else [value]
            if field.type == _STRING:
                for i, item in enumerate(items):
                    if not isinstance(item, str):
                        name = path + field.name + (f"[{i}]" if repeated else "")
                        raise CaffeFormatError(f"{where}: {layer}field {name!r} is not valid UTF-8 "
                                               f"text ({bytes(item)[:80]!r})")
            elif field.type == _MESSAGE and field.message_type.full_name in holders:
                for i, item in enumerate(items):
                    if message.DESCRIPTOR.full_name == "caffe.NetParameter" and \
                            field.name in ("layer", "layers"):
                        walk(item, f"{_layer_label(item, i)}: ", "")
                    else:
                        walk(item, layer, f"{path}{field.name}{f'[{i}]' if repeated else ''}.")
    walk(message, "", "")


def _layer_label(layer, index):
    """"layer 3 'conv1' (Convolution)", from whatever of the name and type is text."""
    label = f"layer {index}"
    if layer.name and isinstance(layer.name, str):
        label += f" {layer.name!r}"
    if isinstance(layer.type, (str, bytes)) and layer.type:
        label += f" ({_text(layer.type)})"
    return label


def check_recognised(message, where, what, required_any=()):
    """A Caffe file decodes into known fields; garbage that happens to parse leaves only unknown
    ones (or none of the fields every real file has)."""
    unknown = _unknown_count(message)
    present = [f.name for f, _ in message.ListFields()]
    if unknown and not present:
        raise CaffeFormatError(f"{where}: not a Caffe {what}: none of its {unknown} fields are "
                               f"{what} fields (garbage, or a different file type)")
    if required_any and not any(name in present for name in required_any):
        raise CaffeFormatError(f"{where}: not a Caffe {what}: it has none of "
                               f"{', '.join(required_any)}")


# ------------------------------------------------------------------------------------------------
# BVLC layer fields whose numbers the fork uses for something else

def fix_bvlc_layer_fields(net, data, where):
    """Re-read LayerParameter fields 143..148 of BVLC files under BVLC numbering (in place).

    A layer whose type is BVLC's user of the number (Input, Crop, ...) gets the field decoded as
    BVLC's message; a layer of the fork's type keeps the fork reading; any other type keeps it
    only if it decodes cleanly, and is dropped with a warning otherwise.
    """
    suspects = [i for i, layer in enumerate(net.layer)
                if any(layer.HasField(fork) for fork, *_ in CLASHING_LAYER_FIELDS.values())]
    if not suspects:
        return net
    raw_layers = [data[f.value_start:f.end] for f in iter_fields(data)
                  if f.number == _LAYER_FIELD and f.wire_type == LEN]
    for index in suspects:
        layer = net.layer[index]
        raw = {}
        for f in iter_fields(raw_layers[index]):
            if f.number in CLASHING_LAYER_FIELDS and f.wire_type == LEN:
                # repeated chunks of one message field merge
                raw[f.number] = raw.get(f.number, b"") + bytes(raw_layers[index][f.value_start:f.end])
        for number, (fork_field, fork_types, bvlc_field, bvlc_types) in \
                CLASHING_LAYER_FIELDS.items():
            if not layer.HasField(fork_field) or layer.type in fork_types:
                continue
            if layer.type in bvlc_types:
                layer.ClearField(fork_field)
                try:
                    getattr(layer, bvlc_field).ParseFromString(raw.get(number, b""))
                except DecodeError:
                    raise CaffeFormatError(
                        f"{where}: layer {layer.name!r} ({layer.type}): field {number} "
                        f"({bvlc_field}) is corrupt") from None
            elif _unknown_count(getattr(layer, fork_field)):
                layer.ClearField(fork_field)
                warnings.warn(
                    f"{where}: layer {layer.name!r} ({layer.type}): field number {number} is "
                    f"{fork_field} in the segaware fork and {bvlc_field} in BVLC Caffe, and its "
                    f"content fits neither for this layer type; dropped", stacklevel=3)
    return net


# ------------------------------------------------------------------------------------------------
# BlobProto <-> numpy

def blob_shape(blob):
    """The shape a BlobProto declares: `shape.dim`, else legacy num/channels/height/width."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    legacy = ("num", "channels", "height", "width")
    if any(blob.HasField(f) for f in legacy):
        return tuple(int(getattr(blob, f)) for f in legacy)
    return ()  # Caffe writes no shape at all for a 0-axis (scalar) blob


def check_blob(blob, where="blob", diff=False):
    """(shape, stored values, numpy dtype) of a BlobProto after checking that the declared shape
    matches the number of stored values, so that a corrupt header cannot ask for terabytes."""
    shape = blob_shape(blob)
    if any(d < 0 for d in shape):
        raise CaffeFormatError(f"{where}: negative dimension in declared shape {shape}")
    count = 1
    for d in shape:
        count *= d
    single, double = (blob.diff, blob.double_diff) if diff else (blob.data, blob.double_data)
    values, dtype = (double, np.float64) if len(double) else (single, np.float32)
    if len(values) != count:
        kind = "diff" if diff else "data"
        raise CaffeFormatError(
            f"{where}: declared shape {shape} has {count} elements but the blob holds "
            f"{len(values)} {kind} values (corrupt or truncated file)")
    return shape, values, dtype


def blob_to_array(blob, where="blob", diff=False):
    """BlobProto -> float32 array (float64 for double_data), its size checked first."""
    shape, values, dtype = check_blob(blob, where, diff)
    return np.asarray(values, dtype=dtype).reshape(shape)


def array_to_blob(array, diff=None, double=False):
    """numpy array (or torch tensor) -> BlobProto with `shape` set (float32 unless double)."""
    array = _as_numpy(array)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in array.shape)
    data_field, diff_field = ("double_data", "double_diff") if double else ("data", "diff")
    dtype = "<f8" if double else "<f4"
    _merge_packed(blob, data_field, array, dtype)
    if diff is not None:
        diff = _as_numpy(diff)
        if diff.shape != array.shape:
            raise ValueError(f"diff shape {diff.shape} differs from data shape {array.shape}")
        _merge_packed(blob, diff_field, diff, dtype)
    return blob


def _merge_packed(blob, field_name, array, dtype):
    """Append array to a packed repeated float/double field through its wire bytes (a Python
    list round trip costs seconds for a 10M-value blob)."""
    payload = np.ascontiguousarray(array, dtype=dtype).tobytes()
    if not payload:
        return
    number = blob.DESCRIPTOR.fields_by_name[field_name].number
    blob.MergeFromString(encode_len_field(number, payload))


def _as_numpy(value):
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"expected a numeric array, got dtype {array.dtype}")
    return array
