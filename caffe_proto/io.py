"""Read and write every file a Caffe user has: net and solver prototxt (templates, old formats),
.caffemodel weights (fork or BVLC), .binaryproto mean files and .solverstate snapshots.

Readers take a path (str or PathLike) or the content itself (prototxt text, or bytes); every
failure is a CaffeFormatError naming the file and the place. Writers never replace an existing
file unless overwrite=True.
"""
import os

from . import caffe_pb2
from .binary import (array_to_blob, blob_shape, blob_to_array, check_blob, check_recognised,
                     fix_bvlc_layer_fields, parse_binary, read_bytes)
from .dialects import READ_ORDER, DialectError, from_dialect, to_dialect
from .errors import CaffeFormatError
from .text import load_text, parse_text, read_variables, substitute
from .upgrade import upgrade_net, upgrade_net_input, upgrade_solver
from ..files import write_new
from .wire import WireError

__all__ = [
    "read_net", "read_solver", "read_weights", "write_weights", "read_blob", "write_blob",
    "read_solverstate", "write_solverstate", "read_variables", "blob_to_array", "array_to_blob",
    "blob_shape", "weights_to_arrays", "write_net", "upgrade_net_input", "detect_dialect",
]


def read_net(path_or_text, variables=None, *, upgrade=True, upgrade_inputs=False):
    """NetParameter from a .prototxt path or prototxt text.

    variables: {"CROP_SIZE": 321, ...} or the path of a KEY=value file, substituted into `${...}`
    placeholders first. V0/V1 nets are upgraded to `layer` messages (upgrade=False keeps them);
    net-level legacy inputs become an Input layer only with upgrade_inputs=True.
    """
    text, where, _ = load_text(path_or_text)
    text = substitute(text, variables, where)
    net = parse_text(text, caffe_pb2.NetParameter(), where)
    if upgrade:
        upgrade_net(net, where, upgrade_inputs=upgrade_inputs)
    return net


def read_solver(path_or_text, variables=None, *, load_nets=False, upgrade=True):
    """SolverParameter from a solver .prototxt (solver_type enum upgraded to the type string).

    load_nets=True also reads the net files it names (net / train_net / test_net, with the same
    variables) into net_param / train_net_param / test_net_param, so the result is
    self-contained; relative names are looked up from the working directory (as Caffe does) and
    then from the solver file's directory. A missing net file is an error.
    """
    text, where, path = load_text(path_or_text)
    text = substitute(text, variables, where)
    solver = parse_text(text, caffe_pb2.SolverParameter(), where)
    if upgrade:
        upgrade_solver(solver, where)
    if load_nets:
        base_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        _load_solver_nets(solver, where, base_dir, variables)
    return solver


def _load_solver_nets(solver, where, base_dir, variables):
    def load(field_name, name):
        candidates = [name] if os.path.isabs(name) else [name, os.path.join(base_dir, name)]
        for candidate in candidates:
            if os.path.isfile(candidate):
                return read_net(candidate, variables)
        raise CaffeFormatError(
            f"{where}: {field_name}: net file {name!r} not found (looked in "
            f"{' and '.join(repr(os.path.abspath(c)) for c in candidates)})")
    if solver.HasField("net"):
        solver.net_param.CopyFrom(load("net", solver.net))
        solver.ClearField("net")
    if solver.HasField("train_net"):
        solver.train_net_param.CopyFrom(load("train_net", solver.train_net))
        solver.ClearField("train_net")
    for name in solver.test_net:
        solver.test_net_param.add().CopyFrom(load("test_net", name))
    solver.ClearField("test_net")
    if not (solver.HasField("net_param") or solver.HasField("train_net_param")):
        raise CaffeFormatError(f"{where}: the solver names no training net (set net or train_net)")


def read_weights(path_or_bytes, *, upgrade=True, dialect=None):
    """NetParameter with blobs from a .caffemodel written by the fork, BVLC Caffe or SSD.

    The dialect (field numbering) is recognised from the bytes (see caffe_proto.dialects), or
    forced with dialect="segaware" / "bvlc" / "ssd". BVLC layer fields whose numbers the fork
    reuses (input_param, crop_param, ...: 143..148) are re-read per layer type; V0/V1 files are
    upgraded. Blob sizes are checked against their declared shapes.
    """
    data, where = read_bytes(path_or_bytes)
    net, _, wire = parse_binary(data, caffe_pb2.NetParameter(), where,
                                ".caffemodel (NetParameter)", dialect=dialect)
    check_recognised(net, where, ".caffemodel (NetParameter)", required_any=("layer", "layers"))
    fix_bvlc_layer_fields(net, wire, where)
    if upgrade:
        upgrade_net(net, where)
    for layer in list(net.layer) + list(net.layers):
        for index, blob in enumerate(layer.blobs):
            check_blob(blob, f"{where}: layer {layer.name!r} blob {index}")
    return net


def weights_to_arrays(net):
    """{layer name: [numpy arrays]} for every layer with blobs (first layer of a name wins, as in
    Caffe's loading)."""
    arrays = {}
    for layer in net.layer:
        if layer.blobs and layer.name not in arrays:
            arrays[layer.name] = [blob_to_array(blob, f"layer {layer.name!r} blob {i}")
                                  for i, blob in enumerate(layer.blobs)]
    return arrays


def write_weights(net_param_or_blobs, path, *, types=None, overwrite=False, name=None,
                  dialect="segaware"):
    """Write a .caffemodel from a NetParameter, or from {layer name: [arrays]} (numpy or torch).

    types: optional {layer name: Caffe type} recorded in the file (Caffe ignores types when it
    loads weights; some tools show them). dialect: the field numbering of the file ("segaware",
    "bvlc" or "ssd"); a field the dialect has no number for is an error naming it.
    """
    if isinstance(net_param_or_blobs, caffe_pb2.NetParameter):
        net = net_param_or_blobs
    elif hasattr(net_param_or_blobs, "items"):
        net = caffe_pb2.NetParameter()
        if name:
            net.name = name
        types = types or {}
        for layer_name, blobs in net_param_or_blobs.items():
            layer = net.layer.add(name=str(layer_name))
            if layer_name in types:
                layer.type = types[layer_name]
            layer.blobs.extend(array_to_blob(array) for array in blobs)
    else:
        raise TypeError(f"write_weights needs a NetParameter or a dict {{layer name: [arrays]}}, "
                        f"got {type(net_param_or_blobs).__name__}")
    data = net.SerializeToString()
    if dialect != "segaware":
        try:
            data = to_dialect(data, caffe_pb2.NetParameter, dialect)
        except DialectError as e:
            raise DialectError(f"{os.fspath(path)}: cannot write the {dialect} dialect: {e}") from None
    _write_bytes(path, data, overwrite)


def detect_dialect(path_or_bytes):
    """The dialect ("segaware" or "ssd") whose numbering a .caffemodel's bytes fit, or None
    when none does (see caffe_proto.dialects; files of BVLC Caffe read as "segaware")."""
    data, where = read_bytes(path_or_bytes)
    for name in READ_ORDER:
        try:
            _, misfits = from_dialect(data, caffe_pb2.NetParameter.DESCRIPTOR, name)
        except WireError:
            return None
        if not misfits:
            return name
    return None


def write_net(net, path, *, overwrite=False):
    """Write a NetParameter as prototxt text."""
    from google.protobuf import text_format
    _write_bytes(path, text_format.MessageToString(net).encode(), overwrite)


def read_blob(path_or_bytes):
    """numpy array from a .binaryproto (a mean file: BlobProto, usually (1, C, H, W))."""
    data, where = read_bytes(path_or_bytes)
    blob, _, _ = parse_binary(data, caffe_pb2.BlobProto(), where, ".binaryproto (BlobProto)")
    check_recognised(blob, where, ".binaryproto (BlobProto)")
    return blob_to_array(blob, where)


def write_blob(array, path, *, overwrite=False):
    """Write one array as a .binaryproto (BlobProto)."""
    _write_bytes(path, array_to_blob(array).SerializeToString(), overwrite)


def read_solverstate(path_or_bytes):
    """SolverState (iter, learned_net, history blobs, current_step) from a .solverstate file.
    Use blob_to_array on `state.history[i]` for the arrays."""
    data, where = read_bytes(path_or_bytes)
    state, _, _ = parse_binary(data, caffe_pb2.SolverState(), where, ".solverstate (SolverState)")
    check_recognised(state, where, ".solverstate (SolverState)")
    check_solverstate_complete(state, where)
    for index, blob in enumerate(state.history):
        check_blob(blob, f"{where}: history blob {index}")
    return state


# Caffe's SnapshotSolverState sets iter, learned_net and current_step (and adds one history blob
# per learnable blob); protobuf writes fields in number order, so current_step comes last
SOLVERSTATE_FIELDS = ("iter", "learned_net", "current_step")


def check_solverstate_complete(state, where):
    """A state without one of the fields Caffe always writes was cut short (or was never a whole
    snapshot): restoring it would silently start from step 0 or without weights."""
    missing = [name for name in SOLVERSTATE_FIELDS if not state.HasField(name)]
    if missing:
        numbers = caffe_pb2.SolverState.DESCRIPTOR.fields_by_name
        listed = ", ".join(f"{name} (field {numbers[name].number})" for name in missing)
        raise CaffeFormatError(
            f"{where}: incomplete .solverstate: no {listed}; Caffe writes iter, learned_net, "
            f"the history blobs ({len(state.history)} here) and current_step, in that order, so "
            f"the file is truncated or was not written by a Caffe solver")


def write_solverstate(state, path, *, overwrite=False):
    if not isinstance(state, caffe_pb2.SolverState):
        raise TypeError(f"write_solverstate needs a SolverState, got {type(state).__name__}")
    _write_bytes(path, state.SerializeToString(), overwrite)


def _write_bytes(path, data, overwrite):
    write_new(path, data, overwrite=overwrite)
