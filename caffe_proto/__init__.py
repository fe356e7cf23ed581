"""Read and write Caffe files (prototxt, caffemodel, binaryproto, solver, solverstate) without Caffe.

The schema is ours (`caffe.proto`), wire- and text-compatible with the segaware fork and BVLC Caffe.
"""
from . import caffe_pb2
from .errors import CaffeFormatError
from .io import (
    read_net, read_solver, read_weights, write_weights, read_blob, write_blob,
    read_solverstate, write_solverstate, blob_to_array, array_to_blob,
)

__all__ = [
    "caffe_pb2", "CaffeFormatError", "read_net", "read_solver", "read_weights", "write_weights",
    "read_blob", "write_blob", "read_solverstate", "write_solverstate", "blob_to_array",
    "array_to_blob",
]
