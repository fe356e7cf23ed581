"""Options shared by the verbs: template variables, the device, output files, and the error
class for bad option values."""
import os

from segaware_caffe import caffe_proto
from segaware_caffe.errors import SegawareError
from segaware_caffe.files import CLI_HINT, prepare_output_folder, refuse_existing


class UsageError(SegawareError, ValueError):
    """An option value that cannot work (a malformed NAME=VALUE, a device this machine lacks);
    the message names the option."""


def add_variable_arguments(parser):
    """--set VAR=value (repeatable) and --vars FILE, for ${VAR} templates of prototxts."""
    parser.add_argument("--set", "--var", dest="set", action="append", default=[],
                        metavar="VAR=value", help="value of a ${VAR} template variable (repeatable)")
    parser.add_argument("--vars", "--variables", dest="vars", metavar="FILE",
                        help="shell-style KEY=value file of template variables")


def parse_assignments(values, what):
    """{NAME: VALUE} from NAME=VALUE strings; `what` names the option in errors."""
    result = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise UsageError(f"{what} must look like NAME=VALUE, got {value!r}")
        result[name] = rest
    return result


def parse_variables(assignments, vars_file=None):
    """{name: value} from a KEY=value file, then --set VAR=value items (which win)."""
    variables = dict(caffe_proto.read_variables(vars_file)) if vars_file else {}
    variables.update(parse_assignments(assignments, "--set"))
    return variables


def variables_from(args):
    """The template variables given on the command line, or None."""
    return parse_variables(args.set, args.vars) or None


# ---------------------------------------------------------------------------- input shapes
def add_input_shape_argument(parser, what="build the net with this input shape"):
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=N,C,H,W",
                        help=f"{what} (repeatable); a deploy net that hard-codes sizes tied to its "
                             f"input (Interp, Tile, the other scales' inputs) follows a new height "
                             f"and width of its first input")


def parse_input_shapes(items):
    """{input: shape} from NAME=N,C,H,W items."""
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            sep = ""
        if not sep or not name:
            raise UsageError(f"--input-shape expects NAME=N,C,H,W, got {item!r}")
        if any(d < 0 for d in shape):
            raise UsageError(f"--input-shape {item}: dimensions must be >= 0")
        shapes[name] = shape
    return shapes


def sized_net(model, variables, input_shapes):
    """The NetSource of `model` with `input_shapes` ({input: shape}) declared, moved to the new
    height and width of its first input when they change (see resize.resize_to_inputs)."""
    from segaware_caffe.canonical import NetSource, read_net_source
    from segaware_caffe.resize import resize_to_inputs

    source = read_net_source(model, variables=variables or None)
    if not input_shapes:
        return source
    param, _ = resize_to_inputs(source.param, input_shapes)
    return NetSource(param, source.where, source.base_dir, source.path)


# ---------------------------------------------------------------------------- devices
def parse_device(text, option="--device", shown=None):
    """torch.device for an option value, checked against this machine: an unknown name, a CUDA
    device without CUDA, or an index past the last GPU is a UsageError naming the option (and the
    value as the user wrote it, `shown`, when it was translated)."""
    import torch

    value = str(text).strip()
    text = text if shown is None else shown
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{option} {text!r}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"{option} {text}: device type {device.type!r} is not supported; "
                         f"expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise UsageError(f"{option} {text}: no CUDA device is available on this machine (torch "
                         f"{torch.__version__} built with {built}); "
                         + ("use --device cpu" if option == "--device" else
                            f"leave out {option} to run on the CPU"))
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"{option} {text}: this machine has {count} CUDA device(s), "
                         f"cuda:0..cuda:{count - 1}")
    return device


def device_from_gpu(gpu):
    """torch device string for caffe's --gpu value (None: let the caller decide)."""
    if gpu is None:
        return None
    if gpu == "all":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        parse_device(device, "--gpu", shown=gpu)
        return device
    ids = gpu.split(",")
    if len(ids) > 1:
        raise UsageError(f"--gpu {gpu}: one device per process; run several with torchrun "
                         f"--nproc_per_node {len(ids)} and --gpu all")
    if not ids[0].strip().isdigit():
        raise UsageError(f"--gpu expects a device index or 'all', got {gpu!r}")
    device = f"cuda:{int(ids[0])}"
    parse_device(device, "--gpu", shown=gpu)
    return device


def _converted(text, convert, what):
    """convert(text) for an argparse type, refused as "expected <what>" when it does not convert."""
    import argparse
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def int32(text):
    """argparse type: an integer that fits Caffe's int32 fields (NetState.level, ...)."""
    import argparse
    value = _converted(text, int, "an integer")
    if not -2**31 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"expected a 32-bit integer, got {value}")
    return value


def seconds(text):
    """argparse type: a number of seconds > 0."""
    import argparse
    import math
    value = _converted(text, float, "a number of seconds")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_max_seconds_argument(parser, what):
    parser.add_argument("--max-seconds", type=seconds, metavar="S",
                        help=f"stop after S seconds ({what})")


def check_iterations(value, option="--iterations"):
    """A count of iterations from the command line: > 0 and within segaware_caffe.limits."""
    from segaware_caffe import limits
    if value <= 0:
        raise UsageError(f"{option} must be > 0, got {value}")
    return limits.check(value, "iterations", option, "command line")


def add_device_arguments(parser, *, gpu=True, default=None):
    """--device DEV (and caffe's --gpu ID when `gpu`), one of the two."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--device", default=default, metavar="DEV",
                       help="torch device: cpu, cuda or cuda:N"
                            + (f" (default {default})" if default else ""))
    if gpu:
        group.add_argument("--gpu", metavar="ID",
                           help="CUDA device index, like caffe's --gpu (under torchrun: 'all' = "
                                "one device per rank)")


def device_from_args(args):
    """The torch device string the options ask for, checked; None when neither was given."""
    gpu = getattr(args, "gpu", None)
    if gpu is not None:
        return device_from_gpu(gpu)
    if getattr(args, "device", None) is not None:
        return str(parse_device(args.device))
    return None


# ---------------------------------------------------------------------------- output files
def add_force_argument(parser, what="existing output files"):
    parser.add_argument("--force", action="store_true", help=f"replace {what}")


def check_new_file(path, force):
    """Refuse an existing output file unless --force."""
    return refuse_existing(path, force, CLI_HINT)


def prepare_output_dir(path, force):
    """Create an output folder, refusing an existing non-empty one unless --force."""
    return prepare_output_folder(path, overwrite=force, hint="pass --force to write into it")
