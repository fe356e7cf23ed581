"""Run a deploy net at another input size.

The released deploy nets hard-code sizes tied to their input (Interp height/width, spatial Tile
counts, the inputs of the other scales, DummyData xy maps). Caffe's align-corners resizes keep the
relation v - 1 = (D - 1) * r between such a value v and the input's extent D along the same axis,
so for a new extent S every tied constant v becomes (v - 1) * (S - 1) / (D - 1) + 1. Heights follow
the input's height and widths its width, so a square net can be moved to 161 x 241.

A constant counts as tied when v - 1 is at least a sixteenth of D - 1 (the released nets tie
sizes at strides up to 8); smaller ones, like the 13 x 13 position patch of the embs deploy net
(the extent of a 5-tap kernel at dilation 3), belong to a kernel, not to the image, and are kept.
A new size at which a tied constant would not be whole is refused, with the nearest sizes that
work (the net's layers could not line up there).
"""
import math

from segaware_caffe.caffe_proto import caffe_pb2

from .canonical import declared_inputs, legacy_inputs_as_layer, override_input_shapes
from .errors import NetBuildError

TIED_FRACTION = 16     # a constant v is tied when (v - 1) * 16 >= D - 1


def _pair(size, where):
    if isinstance(size, int):
        size = (size, size)
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise NetBuildError(f"{where}: a size is an integer or (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise NetBuildError(f"{where}: sizes must be >= 1, got {height}x{width} (height x width)")
    return height, width


def _copy_with_input_layer(net_param):
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    legacy_inputs_as_layer(out, f"net {net_param.name!r}")
    return out


def main_input_size(net_param):
    """(height, width) of the first 4-D input (legacy net-level inputs or the first Input layer)."""
    where = f"net {net_param.name!r}"
    declared = list(declared_inputs(_copy_with_input_layer(net_param)).items())
    if not declared:
        raise NetBuildError(f"{where} declares no input shape to resize")
    name, dims = declared[0]
    if len(dims) != 4:
        raise NetBuildError(f"{where}: resizing needs a 4-D (N, C, H, W) first input, input "
                            f"{name!r} is {list(dims)}")
    return int(dims[2]), int(dims[3])


def _constants(out):
    """[(axis, value, setter, what)] of every spatial constant of the net: axis 0 = height,
    1 = width. Setters write a new value into `out`."""
    found = []

    def shape_dims(shape, what):
        for i in range(2, min(len(shape.dim), 4)):
            found.append((i - 2, int(shape.dim[i]), lambda v, s=shape, i=i: s.dim.__setitem__(i, v),
                          f"{what} dim {i}"))

    for lp in out.layer:
        label = f"layer {lp.name!r} ({lp.type})"
        if lp.type == "Input":
            for i, shape in enumerate(lp.input_param.shape):
                top = lp.top[i] if i < len(lp.top) and len(lp.input_param.shape) > 1 else \
                    ", ".join(lp.top) or lp.name
                shape_dims(shape, f"input {top!r}")
        elif lp.type == "DummyData":
            dp = lp.dummy_data_param
            for shape in dp.shape:
                shape_dims(shape, label)
            for axis, field, name in ((0, dp.height, "height"), (1, dp.width, "width")):
                for i in range(len(field)):
                    found.append((axis, int(field[i]), lambda v, f=field, i=i: f.__setitem__(i, v),
                                  f"{label} {name}"))
        elif lp.type == "Interp":
            ip = lp.interp_param
            for axis, name in ((0, "height"), (1, "width")):
                if ip.HasField(name):
                    found.append((axis, int(getattr(ip, name)),
                                  lambda v, ip=ip, name=name: setattr(ip, name, v), f"{label} {name}"))
        elif lp.type == "Tile" and lp.tile_param.axis in (2, 3, -1, -2):
            axis = 0 if lp.tile_param.axis in (2, -2) else 1
            found.append((axis, int(lp.tile_param.tiles),
                          lambda v, tp=lp.tile_param: setattr(tp, "tiles", v), f"{label} tiles"))
    return found


def _tied(value, declared):
    return value > 1 and declared > 1 and (value - 1) * TIED_FRACTION >= declared - 1


def _step(constants, declared):
    """The smallest m such that every tied constant stays whole at any extent S with m | S - 1."""
    step = 1
    for value in constants:
        step = math.lcm(step, (declared - 1) // math.gcd(declared - 1, value - 1))
    return step


def resize_deploy(net_param, size):
    """A copy of `net_param` whose size-tied constants follow an input of `size` (an int for a
    square input, or (height, width)); legacy net-level inputs become an Input layer, as every
    builder reads them. Raises NetBuildError where a tied constant would not be whole."""
    where = f"net {net_param.name!r}"
    declared = main_input_size(net_param)
    target = _pair(size, where)
    out = _copy_with_input_layer(net_param)
    constants = _constants(out)
    for axis, name in ((0, "height"), (1, "width")):
        d, s = declared[axis], target[axis]
        if d == s:
            continue
        tied = [(v, what) for a, v, _, what in constants if a == axis and _tied(v, d)]
        step = _step([v for v, _ in tied], d)
        if (s - 1) % step:
            below = s - (s - 1) % step
            sizes = [x for x in (below, below + step) if x >= 1]
            value, what = next((v, w) for v, w in tied if ((v - 1) * (s - 1)) % (d - 1))
            raise NetBuildError(
                f"{where}: cannot run at input {name} {s}: {what} is {value} at the declared "
                f"{name} {d}, which would become {(value - 1) * (s - 1) / (d - 1) + 1:g}; input "
                f"{name}s with {name} - 1 a multiple of {step} work (nearest: "
                f"{', '.join(map(str, sizes))})")
    for axis, value, setter, _ in constants:
        d, s = declared[axis], target[axis]
        if d != s and _tied(value, d):
            setter((value - 1) * (s - 1) // (d - 1) + 1)
    return out


def resize_to_inputs(net_param, input_shapes):
    """`net_param` ready to build with `input_shapes` ({input: shape}): when the first 4-D input
    changes its height or width, the net's tied constants follow it (resize_deploy), then the
    given shapes replace the declared ones. Returns (NetParameter, resized?)."""
    where = f"net {net_param.name!r}"
    out = _copy_with_input_layer(net_param)
    declared = declared_inputs(out)
    first = next(iter(declared.items()), None)
    resized = False
    if first is not None and first[0] in input_shapes:
        name, dims = first
        given = tuple(int(d) for d in input_shapes[name])
        if len(dims) == 4 and len(given) == 4 and given[2:] != tuple(dims[2:]):
            out = resize_deploy(out, given[2:])
            resized = True
    if input_shapes:
        override_input_shapes(out, input_shapes, where)
    return out, resized
