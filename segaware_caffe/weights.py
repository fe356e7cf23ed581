"""One codec between .caffemodel blobs and the parameters of a built Net.

Caffe's CopyTrainedLayersFrom is the rule (`match_weights`): every layer of the file, in file
order, is matched by name to the first net layer of that name (the type is not compared); a file
layer with no such net layer is ignored, and a later file layer of a name overwrites an earlier
one. A matched pair must have the same number of blobs (a blob-less file layer for a layer with
parameters is an error too), and each blob's shape must be the parameter's exactly or, for a blob
stored with the legacy num/channels/height/width fields, after right-aligning the parameter's
shape into 4-D (a bias of shape (N) stored as 1 x 1 x 1 x N).

Net.load_weights, the converters (caffemodel <-> safetensors/.pt), the Solver (--weights and
restore) and `inspect` all use it; a file is parsed once (`WeightsFile`) however many nets it
goes into, and each blob is decoded once (`WeightsFile.array`).
"""
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2

from .errors import NetBuildError, NonFiniteWarning

LEGACY_FIELDS = ("num", "channels", "height", "width")


def first_records_by_name(net):
    """{layer name: the first LayerRecord of that name}, in net order: the layer Caffe copies a
    file's blobs into (CopyTrainedLayersFrom) and shares a train net's blobs with
    (ShareTrainedLayersWith)."""
    records = OrderedDict()
    for record in net.records:
        records.setdefault(record.name, record)
    return records


def is_legacy_blob(blob):
    """Whether a BlobProto gives its shape with the legacy num/channels/height/width fields."""
    return not blob.HasField("shape") and any(blob.HasField(f) for f in LEGACY_FIELDS)


def layer_name(layer):
    """A file layer's name as text: protobuf hands back bytes for a name that is not UTF-8 (a
    damaged file); those bytes are shown escaped, and match no net layer."""
    name = layer.name
    return name if isinstance(name, str) else bytes(name).decode("utf-8", "backslashreplace")


def shape_fits(stored, wanted, legacy):
    """Caffe's Blob::ShapeEquals: equal shapes, or (legacy 4-D blobs) equal after right-aligning
    `wanted` into 4-D."""
    stored, wanted = tuple(stored), tuple(wanted)
    if stored == wanted:
        return True
    return legacy and len(wanted) <= 4 and stored == (1,) * (4 - len(wanted)) + wanted


class WeightsFile:
    """A .caffemodel (path, bytes or NetParameter) parsed once, its blobs decoded on demand."""

    def __init__(self, weights):
        if isinstance(weights, caffe_pb2.NetParameter):
            self.param, self.where = weights, "weights"
        else:
            self.param = caffe_proto.read_weights(weights)
            self.where = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "weights"
        self.layers = list(self.param.layer) + list(self.param.layers)
        self.names = [layer_name(layer) for layer in self.layers]
        self._arrays = {}

    @classmethod
    def of(cls, weights):
        return weights if isinstance(weights, cls) else cls(weights)

    def array(self, layer_index, blob_index):
        """Blob `blob_index` of file layer `layer_index` as a numpy array (float32, or float64
        for double_data), in its stored shape."""
        key = (layer_index, blob_index)
        if key not in self._arrays:
            layer = self.layers[layer_index]
            where = f"{self.where}: layer {self.names[layer_index]!r} blob {blob_index}"
            # the one place a stored blob becomes numbers (checks of its values belong here)
            array = caffe_proto.blob_to_array(layer.blobs[blob_index], where)
            warn_non_finite(array, where)
            self._arrays[key] = array
        return self._arrays[key]


def warn_non_finite(array, where):
    """Warn (NonFiniteWarning) when a stored blob holds NaN or infinite values: Caffe loads them
    silently and every output that depends on them is then NaN."""
    if array.dtype.kind != "f" or not array.size:
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nans = int(np.isnan(array).sum())
    infs = int(array.size - finite.sum()) - nans
    counts = " and ".join(f"{n} {what}" for n, what in ((nans, "NaN"), (infs, "infinite"))
                          if n)
    first = np.unravel_index(int(np.argmin(finite.reshape(-1))), array.shape) if array.ndim \
        else ()
    warnings.warn(f"{where} (shape {tuple(array.shape)}) holds {counts} value(s) of "
                  f"{array.size} (the first at index {tuple(int(i) for i in first)}); outputs "
                  f"that depend on them will not be finite", NonFiniteWarning, stacklevel=3)


def renamed(weights, rules):
    """A WeightsFile whose layers are renamed by `rules`, [(pattern, replacement)]: a layer whose
    whole name matches a pattern (the first that does; Python regular expressions) takes the
    replacement, with \\1 or \\g<name> for the pattern's groups; other layers keep their names.
    Raises NetBuildError when a rule yields an empty name."""
    import re

    weights = WeightsFile.of(weights)
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    param = caffe_pb2.NetParameter()
    param.CopyFrom(weights.param)
    for layer in list(param.layer) + list(param.layers):
        for pattern, replacement in compiled:
            match = pattern.fullmatch(layer.name)
            if match:
                new = match.expand(replacement)
                if not new:
                    raise NetBuildError(f"{weights.where}: renaming layer {layer.name!r} by "
                                        f"{pattern.pattern!r} gives an empty name")
                layer.name = new
                break
    out = WeightsFile(param)
    out.where = weights.where
    return out


@dataclass
class LayerWeights:
    """The file layer whose blobs a net layer takes (the last file layer of that name)."""
    name: str
    record: object                  # the net's LayerRecord (first of its name)
    layer_index: int                # index into WeightsFile.layers
    attributes: list                # the record's blob attribute names, Caffe order

    def blobs(self, weights):
        return list(weights.layers[self.layer_index].blobs)


@dataclass
class WeightsMatch:
    """What the file gives the net: `layers` (net layer name -> LayerWeights, in the order the
    file first names them), file layers that have blobs but no net layer (`not_in_net`), and net
    layers with parameters the file does not set (`not_in_weights`: missing from the file, or a
    later namesake of a loaded layer)."""
    weights: WeightsFile
    layers: OrderedDict = field(default_factory=OrderedDict)
    not_in_net: list = field(default_factory=list)
    not_in_weights: list = field(default_factory=list)
    ends_at: str = None      # see _cut_point

    def tensors(self, dtype=None):
        """{"<layer key>.<attribute>": tensor} for every matched blob (each decoded once)."""
        out = OrderedDict()
        for match in self.layers.values():
            for i, attr in enumerate(match.attributes):
                array = self.weights.array(match.layer_index, i)
                want = tuple(getattr(match.record.module, attr).shape)
                # a copy, not ascontiguousarray: that turns a 0-axis blob into shape (1,)
                tensor = torch.from_numpy(array.reshape(want).copy())
                out[f"{match.record.key}.{attr}"] = tensor if dtype is None else tensor.to(dtype)
        return out


def blob_attributes(module):
    """Attribute names of the blobs a layer module stores in a caffemodel, Caffe order (CAFFE_BLOBS
    less the ones this instance does not have, e.g. `bias` with bias_term: false)."""
    return [n for n in module.CAFFE_BLOBS if getattr(module, n, None) is not None]


def match_weights(net, weights):
    """Caffe's matching of a .caffemodel's layers to `net`'s (module docstring). `weights`:
    anything WeightsFile takes, or a WeightsFile. Raises NetBuildError naming the file, layer and
    blob on a count or shape mismatch."""
    weights = WeightsFile.of(weights)
    by_name = first_records_by_name(net)
    match = WeightsMatch(weights)
    for index, layer in enumerate(weights.layers):
        name = weights.names[index]
        record = by_name.get(name)
        if record is None:
            if len(layer.blobs) and name not in match.not_in_net:
                match.not_in_net.append(name)
            continue
        attributes = blob_attributes(record.module)
        if not len(layer.blobs) and not attributes:
            continue
        if len(layer.blobs) != len(attributes):
            raise NetBuildError(f"{weights.where}: layer {name} ({record.type}) has "
                                f"{len(layer.blobs)} blob(s) in the weights file, the net expects "
                                f"{len(attributes)} ({', '.join(attributes) or 'none'})")
        for i, (blob, attr) in enumerate(zip(layer.blobs, attributes)):
            stored = caffe_proto.blob_shape(blob)
            want = tuple(getattr(record.module, attr).shape)
            if not shape_fits(stored, want, is_legacy_blob(blob)):
                raise NetBuildError(f"{weights.where}: layer {name} ({record.type}) blob {i} "
                                    f"({attr}) has shape {tuple(stored)} in the weights file, the "
                                    f"net expects {want}")
        # a later file layer of the name replaces the earlier one (in its place in the order)
        match.layers[name] = LayerWeights(name, record, index, attributes)
    loaded = set(match.layers)
    match.not_in_weights = [r.name for r in net.records
                            if r.module.caffe_blobs() and (r.name not in loaded or by_name[r.name] is not r)]
    match.ends_at = _cut_point(net, weights, match.not_in_weights)
    return match


def _cut_point(net, weights, not_in_weights):
    """The last layer of a file that looks cut short at a layer boundary (a valid protobuf with
    fewer layers): its layers are, in order, exactly the net's first ones, and net layers with
    parameters follow that the file lacks. None otherwise. Caffe writes every layer of the net
    (Net::ToProto), so a complete file of the same net never looks like this."""
    from .canonical import FROM_LEGACY_INPUTS
    if not not_in_weights or not weights.names:
        return None
    names = [r.name for r in net.records if r.origin != FROM_LEGACY_INPUTS]
    count = len(weights.names)
    if count >= len(names) or weights.names != names[:count]:
        return None
    return weights.names[-1]


@dataclass
class WeightsReport:
    """What `Net.load_weights` did: layers copied (`loaded`), net layers with parameters the file
    did not set (`not_in_weights`: partial weights; they keep their filler values), and file
    layers with blobs that the net has no layer for (`not_in_net`: Caffe ignores those silently;
    we report them). `where` names the file; `ends_at` is the file's last layer when the file
    looks cut short at a layer boundary (its layers are exactly the net's first ones)."""
    loaded: list
    not_in_weights: list
    not_in_net: list
    where: str = "the weights file"
    ends_at: str = None

    @property
    def partial(self):
        return bool(self.not_in_weights)

    def __str__(self):
        lines = [f"{self.where}: loaded {len(self.loaded)} layer(s)"]
        if self.not_in_weights:
            cut = (f" (the file ends after layer {self.ends_at!r}, the net goes on: is it cut "
                   f"short?)" if self.ends_at is not None else "")
            lines.append(f"partial weights: {len(self.not_in_weights)} net layer(s) with "
                         f"parameters are not in the weights file and kept their filler values{cut}: "
                         f"{_listing(self.not_in_weights)}")
        if self.not_in_net:
            lines.append(f"ignored {len(self.not_in_net)} layer(s) of the weights file that the net "
                         f"does not have: {_listing(self.not_in_net)}")
        return "; ".join(lines)


def _listing(names, limit=20):
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def copy_weights(net, weights):
    """Copy a .caffemodel's blobs into `net` (match_weights); returns a WeightsReport."""
    match = match_weights(net, weights)
    with torch.no_grad():
        for layer in match.layers.values():
            for i, attr in enumerate(layer.attributes):
                param = getattr(layer.record.module, attr)
                array = match.weights.array(layer.layer_index, i)
                param.copy_(torch.from_numpy(array.reshape(tuple(param.shape))))
    return WeightsReport(list(match.layers), match.not_in_weights, match.not_in_net,
                         where=match.weights.where, ends_at=match.ends_at)


def net_layers_proto(net, blobs_of):
    """A NetParameter like Caffe's Net::ToProto: every layer of `net` as it was built (Split
    layers included; the Input layer that legacy net-level inputs became is left out, the fork
    writing none), with `blobs_of(record)` (a list of BlobProto) as its blobs."""
    from .canonical import FROM_LEGACY_INPUTS
    out = caffe_pb2.NetParameter()
    out.name = net.name
    for record in net.records:
        if record.origin == FROM_LEGACY_INPUTS:
            continue
        layer = out.layer.add()
        layer.CopyFrom(record.param)
        del layer.blobs[:]
        layer.blobs.extend(blobs_of(record))
    return out


def parameter_blobs(record):
    """A record's learnable blobs as float32 BlobProtos (what Caffe's snapshot writes)."""
    return [caffe_proto.array_to_blob(p.detach().to("cpu", torch.float32).numpy())
            for p in record.module.caffe_blobs()]


def history_fits(blob, shape):
    """Whether a stored (history or parameter) BlobProto fits a tensor of `shape`."""
    return shape_fits(caffe_proto.blob_shape(blob), shape, is_legacy_blob(blob))

