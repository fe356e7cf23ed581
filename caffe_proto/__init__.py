"""Read and write Caffe files (prototxt, caffemodel, binaryproto, solver, solverstate) without Caffe.

The schema is ours (`caffe.proto`), wire- and text-compatible with the segaware fork and BVLC Caffe.
"""
from . import caffe_pb2
from .errors import CaffeFormatError
from .io import (
    read_net, read_solver, read_weights, write_weights, read_blob, write_blob,
    read_solverstate, write_solverstate, blob_to_array, array_to_blob, blob_shape,
    read_variables, weights_to_arrays, write_net, upgrade_net_input,
)
from .upgrade import net_format, upgrade_net, upgrade_solver

__all__ = [
    "caffe_pb2", "CaffeFormatError", "read_net", "read_solver", "read_weights", "write_weights",
    "read_blob", "write_blob", "read_solverstate", "write_solverstate", "blob_to_array",
    "array_to_blob", "blob_shape", "read_variables", "weights_to_arrays", "write_net",
    "upgrade_net_input", "net_format", "upgrade_net", "upgrade_solver",
]
