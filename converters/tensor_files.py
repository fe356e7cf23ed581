"""Named-tensor files (.safetensors, torch .pt) read without trusting them.

A .safetensors file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` and the
raw bytes. The header is parsed and checked here before any tensor is allocated: the length fits
the file, the JSON is an object without repeated names, every dtype is known, every shape is a
list of non-negative integers whose byte count equals its offsets' span, and every span lies in
the data and overlaps no other. Tensors are then read one by one from the file.

A .pt file is loaded with torch.load(weights_only=True), which builds tensors and plain containers
only and never runs code from the pickle; its zip directory is checked first so that an entry
cannot claim more bytes than the file could hold. Pre-1.6 (non-zip) torch files are refused: their
pickle states storage sizes that cannot be checked before they are allocated.

The segaware-caffe metadata block (see converters.caffemodel) is validated field by field. Every
problem is a TensorFileError naming the file, and the tensor or metadata field.
"""
import json
import math
import os
import zipfile
from collections import OrderedDict

import torch

from segaware_caffe.errors import TensorFileError
from segaware_caffe.files import API_HINT, open_new, refuse_existing

FORMAT = "segaware-caffe-weights"
VERSION = 1
METADATA_KEY = "caffe"
LEGACY_FIELDS = ("num", "channels", "height", "width")
BLOB_DTYPES = ("float32", "float64")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
# real-valued, dense tensors only: what a layer blob can become
ALLOWED_DTYPES = frozenset(SAFETENSORS_DTYPES.values())
MAX_HEADER_BYTES = 100 * 1024 * 1024      # the safetensors library's own limit


def tensor_format(path):
    """'safetensors' or 'pt' from the file suffix."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth"):
        return "pt"
    raise TensorFileError(f"{os.fspath(path)}: unknown tensor file type {suffix or '(none)'!r}; "
                          f"use .safetensors or .pt/.pth")


def read_tensor_file(path):
    """(OrderedDict name -> tensor, metadata dict or None) from a .safetensors or .pt file."""
    kind = tensor_format(path)
    where = os.fspath(path)
    if not os.path.exists(where):
        raise TensorFileError(f"{where}: no such file")
    if os.path.isdir(where):
        raise TensorFileError(f"{where}: is a folder, expected a {kind} file")
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(where)
    else:
        tensors, metadata = _read_pt(where)
    if metadata is not None:
        check_metadata(metadata, where)
    return tensors, metadata


def write_tensor_file(path, tensors, metadata, *, overwrite=False, hint=API_HINT):
    """Write named tensors with their metadata as .safetensors or .pt (by suffix); an existing
    file is replaced only with `overwrite`."""
    kind = tensor_format(path)
    path = refuse_existing(path, overwrite, hint)
    tensors = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in tensors.items())
    if kind == "safetensors":
        from safetensors.torch import save
        data = save(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        with open_new(path, overwrite=overwrite, hint=hint) as f:
            f.write(data)
    else:
        with open_new(path, overwrite=overwrite, hint=hint) as f:
            torch.save({"state_dict": tensors, "caffe_metadata": metadata}, f)


# ---------------------------------------------------------------------------- safetensors
def _no_repeats(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise TensorFileError(f"the header names {key!r} twice")
        result[key] = value
    return result


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _safetensors_header(f, where, size):
    if size < 8:
        raise TensorFileError(f"{where}: {size} bytes, too short for a safetensors file (an "
                              f"8-byte header length comes first)")
    length = int.from_bytes(f.read(8), "little")
    if length > size - 8 or length > MAX_HEADER_BYTES:
        raise TensorFileError(f"{where}: the header length {length:,} runs past the end of the "
                              f"{size:,}-byte file (truncated, or not a safetensors file)")
    raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats)
    except TensorFileError as e:
        raise TensorFileError(f"{where}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TensorFileError(f"{where}: the header is not JSON ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{where}: the header is a JSON {type(header).__name__}, expected "
                              f"an object of tensors")
    return header, 8 + length


def _check_entry(name, entry, where, data_size):
    """(dtype, shape, begin, end) of one header entry, checked."""
    what = f"{where}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise TensorFileError(f"{what}: entry is a {type(entry).__name__}, expected an object "
                              f"with dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise TensorFileError(f"{what}: entry has no {', '.join(missing)}")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise TensorFileError(f"{what}: dtype {entry['dtype']!r} is not one of "
                              f"{', '.join(SAFETENSORS_DTYPES)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise TensorFileError(f"{what}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)):
        raise TensorFileError(f"{what}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if begin > end or end > data_size:
        raise TensorFileError(f"{what}: data_offsets [{begin}, {end}] lie outside the "
                              f"{data_size:,} data bytes (truncated file or a wrong header)")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes != end - begin:
        raise TensorFileError(f"{what}: shape {shape} of {entry['dtype']} needs {nbytes:,} bytes "
                              f"but data_offsets [{begin}, {end}] hold {end - begin:,}")
    return dtype, tuple(shape), begin, end


def _read_safetensors(where):
    with open(where, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, data_start = _safetensors_header(f, where, size)
        data_size = size - data_start
        extra = header.pop("__metadata__", None)
        if extra is not None and (not isinstance(extra, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items())):
            raise TensorFileError(f"{where}: __metadata__ must map strings to strings")
        entries = [(name, _check_entry(name, entry, where, data_size))
                   for name, entry in header.items()]
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries if end > begin)
        for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
            if begin < end:
                raise TensorFileError(f"{where}: tensors {name!r} and {other!r} share bytes "
                                      f"(overlapping data_offsets)")
        tensors = OrderedDict()
        for name, (dtype, shape, begin, end) in entries:
            f.seek(data_start + begin)
            data = bytearray(f.read(end - begin))
            if len(data) != end - begin:
                raise TensorFileError(f"{where}: tensor {name!r}: the file ends inside its data")
            tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            tensors[name] = tensor.reshape(shape)
    metadata = None
    if extra and METADATA_KEY in extra:
        try:
            metadata = json.loads(extra[METADATA_KEY])
        except (ValueError, RecursionError) as e:
            raise TensorFileError(f"{where}: __metadata__[{METADATA_KEY!r}] is not JSON "
                                  f"({str(e)[:200]})") from None
    return tensors, metadata


# ---------------------------------------------------------------------------- .pt
def _check_zip(where, size):
    try:
        with zipfile.ZipFile(where) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile:
        raise TensorFileError(f"{where}: not a torch zip file (torch.save writes one since torch "
                              f"1.6; an older or a plain pickle file is refused because its sizes "
                              f"cannot be checked before loading)") from None
    except (OSError, ValueError, EOFError, NotImplementedError) as e:
        # NotImplementedError: a directory entry claiming a zip version Python cannot read
        raise TensorFileError(f"{where}: broken zip directory ({type(e).__name__}: {e})") from None
    for entry in entries:
        stored = entry.compress_type == zipfile.ZIP_STORED
        if (stored and entry.file_size > size) or entry.file_size > 2 * size + (1 << 20):
            raise TensorFileError(f"{where}: zip entry {entry.filename!r} claims "
                                  f"{entry.file_size:,} bytes in a {size:,}-byte file")


def _plain_tensors(value, where, what):
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TensorFileError(f"{where}: {what} is a {type(value).__name__}, expected a dict of "
                              f"name -> tensor")
    for name, tensor in value.items():
        if not isinstance(tensor, torch.Tensor):
            raise TensorFileError(f"{where}: tensor {name!r} is a {type(tensor).__name__}, not a "
                                  f"tensor")
        if tensor.layout != torch.strided or tensor.dtype not in ALLOWED_DTYPES:
            raise TensorFileError(f"{where}: tensor {name!r} is {tensor.dtype} "
                                  f"({tensor.layout}); expected a dense real-valued tensor")
    return OrderedDict(value)


def _read_pt(where):
    _check_zip(where, os.path.getsize(where))
    try:
        content = torch.load(where, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:   # torch's unpickler and zip reader raise many types on a broken file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise TensorFileError(f"{where}: holds Python objects other than tensors and plain "
                                  f"containers, which are not loaded ({first[:200]})") from None
        raise TensorFileError(f"{where}: broken torch file ({type(e).__name__}: "
                              f"{first[:200]})") from None
    if isinstance(content, dict) and "state_dict" in content:
        extra = [k for k in content if k not in ("state_dict", "caffe_metadata")]
        if extra:
            raise TensorFileError(f"{where}: unexpected entries {extra[:4]} beside state_dict")
        return (_plain_tensors(content["state_dict"], where, "state_dict"),
                content.get("caffe_metadata"))
    return _plain_tensors(content, where, "the file's content"), None


# ---------------------------------------------------------------------------- metadata
def _expect(condition, where, field, message):
    if not condition:
        raise TensorFileError(f"{where}: metadata {field}: {message}")


def check_metadata(metadata, where="weights metadata"):
    """Raise TensorFileError unless `metadata` has the structure caffemodel_to_tensors writes."""
    _expect(isinstance(metadata, dict), where, "(top level)",
            f"is a {type(metadata).__name__}, expected an object")
    _expect(metadata.get("format") == FORMAT, where, "format",
            f"{metadata.get('format')!r} is not {FORMAT!r} (not segaware-caffe weights metadata)")
    _expect(metadata.get("version") == VERSION, where, "version",
            f"{metadata.get('version')!r} is not supported (this build reads version {VERSION})")
    net = metadata.get("net", {})
    _expect(isinstance(net, dict), where, "net", "expected an object")
    if net.get("variables") is not None:
        _expect(isinstance(net["variables"], dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in net["variables"].items()),
            where, "net.variables", "expected an object of strings")
    if net.get("phase") is not None:
        _expect(net["phase"] in ("train", "test"), where, "net.phase",
                f"{net['phase']!r} is not 'train' or 'test'")
    if net.get("stages") is not None:
        _expect(isinstance(net["stages"], list) and all(isinstance(s, str) for s in net["stages"]),
                where, "net.stages", "expected a list of strings")
    if net.get("level") is not None:
        _expect(_is_int(net["level"]), where, "net.level", f"{net['level']!r} is not an integer")
    if net.get("prototxt_sha256") is not None:
        _expect(isinstance(net["prototxt_sha256"], str), where, "net.prototxt_sha256",
                "expected a string")
    layers = metadata.get("layers")
    _expect(isinstance(layers, list), where, "layers", "expected a list")
    for i, layer in enumerate(layers):
        field = f"layers[{i}]"
        _expect(isinstance(layer, dict), where, field, "expected an object")
        for key in ("name", "key", "type"):
            _expect(isinstance(layer.get(key), str), where, f"{field}.{key}", "expected a string")
        blobs = layer.get("blobs")
        _expect(isinstance(blobs, list), where, f"{field}.blobs", "expected a list")
        for j, blob in enumerate(blobs):
            bfield = f"{field}.blobs[{j}] (layer {layer['name']!r})"
            _expect(isinstance(blob, dict), where, bfield, "expected an object")
            _expect(isinstance(blob.get("tensor"), str), where, f"{bfield}.tensor",
                    "expected a string")
            _expect(blob.get("dtype", "float32") in BLOB_DTYPES, where, f"{bfield}.dtype",
                    f"{blob.get('dtype')!r} is not one of {', '.join(BLOB_DTYPES)}")
            if "shape" in blob:
                _expect(isinstance(blob["shape"], list)
                        and all(_is_int(d) and d >= 0 for d in blob["shape"]),
                        where, f"{bfield}.shape", f"{blob['shape']!r} is not a list of "
                                                  f"non-negative integers")
            if "legacy" in blob:
                legacy = blob["legacy"]
                _expect(isinstance(legacy, dict) and set(legacy) <= set(LEGACY_FIELDS)
                        and all(_is_int(v) and v >= 0 for v in legacy.values()),
                        where, f"{bfield}.legacy", f"{legacy!r} is not an object of "
                                                   f"{'/'.join(LEGACY_FIELDS)} counts")
    return metadata
