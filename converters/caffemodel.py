"""caffemodel <-> named tensors (safetensors or a torch .pt file), bit for bit.

Tensor names are `<key>.<blob attribute>`: `key` is the layer's attribute name under `Net.layers`
(the Caffe name with non-identifier characters replaced, made unique), the attribute is the layer
module's CAFFE_BLOBS name (`conv1.weight`, `conv1.bias`, `bn1.mean`, ...). The same names are the
state_dict keys of an exported module (converters.python_export) and, under `layers.`, of the Net.

A JSON metadata block travels with the tensors (safetensors header key "caffe"; `.pt` files hold
{"state_dict": ..., "caffe_metadata": ...}):

    {"format": "segaware-caffe-weights", "version": 1,
     "net": {"name", "prototxt_sha256", "variables", "phase", "stages", "level"},
     "layers": [{"name": Caffe name, "key": attribute name, "type": Caffe type,
                 "blobs": [{"tensor": "key.weight", "dtype": "float32",
                            "shape": [dims] | "legacy": {"num": n, ...} (absent: 0-axis blob)}]}]}

`layers` keeps Caffe's blob order per layer and the exact shape fields of every source BlobProto
(`shape.dim`, legacy num/channels/height/width, or none), so writing the caffemodel back
reproduces each BlobProto byte for byte.
"""
import hashlib
import os
import warnings
from collections import OrderedDict

import numpy as np
import torch

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.caffe_proto.text import load_text
from segaware_caffe.canonical import NetSource
from segaware_caffe.errors import NetBuildError
from segaware_caffe.files import refuse_existing
from segaware_caffe.weights import (WeightsReport, blob_attributes, first_records_by_name,
                                    match_weights, net_layers_proto, shape_fits)

from . import tensor_files
from .tensor_files import FORMAT, LEGACY_FIELDS, METADATA_KEY, VERSION  # noqa: F401 (public names)

DTYPES = {"float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}


def prototxt_sha256(model):
    """sha256 of the prototxt as given (file bytes, or the text itself; a NetParameter: its
    serialisation). Path or text is decided by the prototxt reader's rule."""
    if isinstance(model, caffe_pb2.NetParameter):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    if isinstance(model, NetSource):
        model = model.path if model.path else model.param
        return prototxt_sha256(model)
    if isinstance(model, (bytes, bytearray)):
        return hashlib.sha256(bytes(model)).hexdigest()
    _, _, path = load_text(model)
    if path is not None:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return hashlib.sha256(model.encode()).hexdigest()


def _shape_fields(blob):
    if blob.HasField("shape"):
        return {"shape": [int(d) for d in blob.shape.dim]}
    legacy = {f: int(getattr(blob, f)) for f in LEGACY_FIELDS if blob.HasField(f)}
    return {"legacy": legacy} if legacy else {}


def _set_shape_fields(blob, entry, array_shape):
    if "shape" in entry:
        blob.shape.dim.extend(entry["shape"])
    elif "legacy" in entry:
        for f, v in entry["legacy"].items():
            setattr(blob, f, v)
    elif array_shape != ():
        blob.shape.dim.extend(array_shape)


def _declared_shape(entry, fallback):
    if "shape" in entry:
        return tuple(entry["shape"])
    if "legacy" in entry:
        return tuple(entry["legacy"].get(f, 1) for f in LEGACY_FIELDS)
    return tuple(fallback)


def caffemodel_to_tensors(net, weights, *, prototxt=None, variables=None, phase=None,
                          stages=(), level=0):
    """Named tensors and metadata from a .caffemodel (path, bytes, NetParameter or WeightsFile)
    for `net`, matched as Caffe loads weights (segaware_caffe.weights.match_weights). Returns
    (tensors, metadata, ignored) with `ignored` the names of caffemodel layers that have blobs but
    no layer in the net (Caffe skips them too)."""
    match = match_weights(net, weights)
    if match.not_in_weights:
        # what a cut or mismatched file leaves out would silently be missing from the output
        report = WeightsReport(list(match.layers), match.not_in_weights, [],
                               where=match.weights.where, ends_at=match.ends_at)
        warnings.warn(f"{report}; the converted file holds only the blobs the weights file has",
                      stacklevel=2)
    tensors = match.tensors()
    layers = []
    for layer in match.layers.values():
        entries = []
        for i, (blob, attr) in enumerate(zip(layer.blobs(match.weights), layer.attributes)):
            array = match.weights.array(layer.layer_index, i)
            entries.append({"tensor": f"{layer.record.key}.{attr}", "dtype": str(array.dtype),
                            **_shape_fields(blob)})
        layers.append({"name": layer.name, "key": layer.record.key, "type": layer.record.type,
                       "blobs": entries})
    metadata = {
        "format": FORMAT, "version": VERSION,
        "net": {"name": net.name, "prototxt_sha256": prototxt_sha256(prototxt) if prototxt is not None else None,
                "variables": {k: str(v) for k, v in (variables or {}).items()},
                "phase": (phase or net.phase).lower(), "stages": list(stages), "level": level},
        "layers": layers,
    }
    return tensors, metadata, match.not_in_net


def net_tensors(net, tensors):
    """The tensors for `net`'s layer blobs, {`<key>.<attr>`: tensor}, checked: every blob present
    with the net's shape. Accepts Net.state_dict() keys (`layers.<key>.<attr>`) too. Returns
    (tensors, unused names)."""
    firsts = first_records_by_name(net)
    expected = {f"{r.key}.{a}": (r, tuple(getattr(r.module, a).shape))
                for r in firsts.values() for a in blob_attributes(r.module)}
    if expected and not any(n in tensors for n in expected) and any(k.startswith("layers.") for k in tensors):
        tensors = OrderedDict((k[len("layers."):], v) for k, v in tensors.items() if k.startswith("layers."))
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise NetBuildError(f"the tensors have no entry for {len(missing)} blob(s) of the net: "
                            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for name, (record, want) in expected.items():
        if tuple(tensors[name].shape) != want:
            raise NetBuildError(f"{record.name} ({record.type}): tensor {name} has shape "
                                f"{tuple(tensors[name].shape)}, the net expects {want}")
    return OrderedDict((n, tensors[n]) for n in expected), [n for n in tensors if n not in expected]


def tensors_to_caffemodel(net, tensors, metadata=None):
    """A NetParameter like Caffe's Net::ToProto (every layer of `net` with its definition) whose
    blobs come from `tensors`. With `metadata` (from caffemodel_to_tensors) each blob gets back its
    original shape fields and precision, so the result matches the source caffemodel bit for bit.
    Without it (a state_dict saved from PyTorch) blobs are float32 with `shape` set.

    Returns (net_param, unused) with `unused` the tensor names no layer blob took."""
    by_tensor = {}
    if metadata is not None:
        check_metadata(metadata)
        for layer in metadata["layers"]:
            for entry in layer["blobs"]:
                by_tensor[entry["tensor"]] = entry
    firsts = first_records_by_name(net)
    tensors, unused = net_tensors(net, tensors)

    def blobs_of(record):
        if firsts[record.name] is not record:
            return []   # Caffe loads a name's blobs into its first layer only
        blobs = []
        for attr in blob_attributes(record.module):
            name = f"{record.key}.{attr}"
            tensor = tensors[name]
            want = tuple(tensor.shape)
            entry = by_tensor.get(name, {})
            np_dtype, torch_dtype = DTYPES[entry.get("dtype", "float32")]
            array = tensor.detach().to("cpu", torch_dtype).contiguous().numpy()
            declared = _declared_shape(entry, want)
            if entry and not shape_fits(declared, want, "legacy" in entry):
                raise NetBuildError(f"{record.name} ({record.type}): metadata shape {declared} of "
                                    f"{name} does not fit the net's {want}")
            blob = caffe_proto.array_to_blob(array, double=np_dtype is np.float64)
            blob.ClearField("shape")
            _set_shape_fields(blob, entry, want)
            blobs.append(blob)
        return blobs
    out = net_layers_proto(net, blobs_of)
    return out, unused


def check_metadata(metadata):
    tensor_files.check_metadata(metadata)


# ---------------------------------------------------------------------------- files
def _open_new(path, overwrite):
    return refuse_existing(path, overwrite, "pass --force (overwrite=True) to replace it")


tensor_format = tensor_files.tensor_format


def save_tensors(path, tensors, metadata, *, overwrite=False):
    """Write named tensors with their metadata as .safetensors or .pt (by file suffix)."""
    tensor_files.write_tensor_file(path, tensors, metadata, overwrite=overwrite,
                                   hint="pass --force (overwrite=True) to replace it")


def load_tensors(path):
    """(tensors, metadata or None) from .safetensors, or from a .pt file holding either what
    save_tensors writes or a plain state_dict; the file is validated before anything is
    allocated (see converters.tensor_files)."""
    return tensor_files.read_tensor_file(path)


def build_net(prototxt, *, variables=None, phase="test", stages=(), level=0, input_shapes=None):
    """The Net whose layers define tensor names and shapes (filler weights), as convert and export
    build it."""
    from segaware_caffe import Net
    return Net(prototxt, phase=phase, variables=variables, stages=stages, level=level,
               input_shapes=input_shapes)


def convert_caffemodel(prototxt, weights, output, *, variables=None, phase="test", stages=(),
                       level=0, overwrite=False):
    """NET.prototxt + WEIGHTS.caffemodel -> output (.safetensors or .pt). Returns
    (metadata, ignored caffemodel layer names)."""
    tensor_format(output)
    _open_new(output, overwrite)
    net = build_net(prototxt, variables=variables, phase=phase, stages=stages, level=level)
    tensors, metadata, ignored = caffemodel_to_tensors(
        net, weights, prototxt=prototxt, variables=variables, phase=phase, stages=stages, level=level)
    save_tensors(output, tensors, metadata, overwrite=overwrite)
    return metadata, ignored


def convert_to_caffemodel(prototxt, tensor_file, output, *, variables=None, phase=None,
                          stages=None, level=None, overwrite=False):
    """NET.prototxt + (.safetensors | .pt) -> output .caffemodel. Phase, stages, level and
    variables default to the ones recorded in the metadata. Returns (metadata or None, notes)."""
    _open_new(output, overwrite)
    tensors, metadata = load_tensors(tensor_file)
    recorded = (metadata or {}).get("net", {})
    if variables is None and recorded.get("variables"):
        variables = recorded["variables"]
    net = build_net(prototxt, variables=variables, phase=phase or recorded.get("phase", "test"),
                    stages=tuple(stages if stages is not None else recorded.get("stages", ())),
                    level=level if level is not None else recorded.get("level", 0))
    notes = []
    digest = recorded.get("prototxt_sha256")
    if digest and digest != prototxt_sha256(prototxt):
        notes.append(f"{prototxt} differs from the prototxt the tensors were converted with "
                     f"(sha256 {digest[:12]}...); layers are matched by name")
    try:
        net_param, unused = tensors_to_caffemodel(net, tensors, metadata)
    except NetBuildError as e:   # say which file the tensors came from
        raise NetBuildError(f"{os.fspath(tensor_file)}: {e}") from None
    if unused:
        notes.append(f"{len(unused)} tensor(s) match no layer blob of the net and were left out: "
                     f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}")
    caffe_proto.write_weights(net_param, output, overwrite=overwrite)
    return metadata, notes
