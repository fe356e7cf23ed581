"""Run a deploy net at another input size.

The released deploy nets hard-code sizes tied to their input (Interp height/width, Tile counts,
the inputs of the other scales, DummyData xy maps). Caffe's align-corners resizes keep the
relation v - 1 = (D - 1) * r between such a value v and the input size D, so for a new size S every
spatial constant v becomes (v - 1) * (S - 1) / (D - 1) + 1 when that is a whole number; values for
which it is not (e.g. embs' 13x13 position input) are independent of the input size and kept.
"""
from segaware_caffe.caffe_proto import caffe_pb2

from .canonical import declared_inputs, legacy_inputs_as_layer


def _mapper(declared, size):
    def new(v):
        num = (int(v) - 1) * (size - 1)
        if v <= 1 or num % (declared - 1):
            return int(v)
        return num // (declared - 1) + 1
    return new


def main_input_size(net_param):
    """Spatial size of the first 4-D input (legacy net-level inputs or the first Input layer)."""
    param = caffe_pb2.NetParameter()
    param.CopyFrom(net_param)
    legacy_inputs_as_layer(param, f"net {net_param.name!r}")
    declared = list(declared_inputs(param).values())
    if not declared:
        raise ValueError(f"net {net_param.name!r} declares no input shape to resize")
    dims = list(declared[0])
    if len(dims) != 4 or dims[2] != dims[3]:
        raise ValueError(f"net {net_param.name!r}: resizing needs a square 4-D first input, got {dims}")
    return int(dims[2])


def resize_deploy(net_param, size):
    """A copy of `net_param` whose size-tied constants follow a square input of `size` (legacy
    net-level inputs become an Input layer, as every builder reads them)."""
    declared = main_input_size(net_param)
    if declared <= 1:
        raise ValueError(f"net {net_param.name!r}: declared input size {declared} cannot be resized")
    new = _mapper(declared, size)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    legacy_inputs_as_layer(out, f"net {net_param.name!r}")

    def resize_shape(shape):
        for i in range(2, len(shape.dim)):
            shape.dim[i] = new(shape.dim[i])

    for lp in out.layer:
        if lp.type == "Input":
            for shape in lp.input_param.shape:
                resize_shape(shape)
        elif lp.type == "DummyData":
            for shape in lp.dummy_data_param.shape:
                resize_shape(shape)
            dp = lp.dummy_data_param
            for field in (dp.height, dp.width):
                for i in range(len(field)):
                    field[i] = new(field[i])
        elif lp.type == "Interp":
            ip = lp.interp_param
            if ip.HasField("height"):
                ip.height = new(ip.height)
            if ip.HasField("width"):
                ip.width = new(ip.width)
        elif lp.type == "Tile" and lp.tile_param.axis in (2, 3, -1, -2):
            lp.tile_param.tiles = new(lp.tile_param.tiles)
    return out
