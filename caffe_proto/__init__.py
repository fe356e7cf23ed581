"""Read and write Caffe files (prototxt, caffemodel, binaryproto, solver, solverstate) without Caffe.

The schema is ours (`caffe.proto`), wire- and text-compatible with the segaware fork and BVLC Caffe.

    net = read_net("train.prototxt", variables={"CROP_SIZE": 321})   # or variables="vars.sh"
    weights = read_weights("model.caffemodel")        # fork, BVLC or SSD file, V0/V1 upgraded
    arrays = weights_to_arrays(weights)               # {layer name: [np.ndarray]}
    write_weights(arrays, "copy.caffemodel", types={"conv1": "Convolution"})
    write_weights(net, "for_ssd.caffemodel", dialect="ssd")   # SSD's field numbers
    mean = read_blob("mean.binaryproto")
    solver = read_solver("solver.prototxt", load_nets=True)
    state = read_solverstate("snap_iter_2.solverstate")

Every failure is a CaffeFormatError (a ValueError) naming the file, the line/column or layer, and
what was expected; writers refuse to replace a file unless overwrite=True.
"""
from . import caffe_pb2
from .errors import CaffeFormatError
from .io import (
    read_net, read_solver, read_weights, write_weights, read_blob, write_blob,
    read_solverstate, write_solverstate, blob_to_array, array_to_blob, blob_shape,
    read_variables, weights_to_arrays, write_net, upgrade_net_input, detect_dialect,
)
from .dialects import DIALECTS
from .upgrade import net_format, upgrade_net, upgrade_solver

__all__ = [
    "caffe_pb2", "CaffeFormatError", "read_net", "read_solver", "read_weights", "write_weights",
    "read_blob", "write_blob", "read_solverstate", "write_solverstate", "blob_to_array",
    "array_to_blob", "blob_shape", "read_variables", "weights_to_arrays", "write_net",
    "upgrade_net_input", "net_format", "upgrade_net", "upgrade_solver", "detect_dialect",
    "DIALECTS",
]
