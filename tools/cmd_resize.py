"""segaware-caffe resize NET.prototxt --size H[xW] -o OUT.prototxt: a deploy net that hard-codes
sizes tied to its input (Interp height/width, spatial Tile counts, the inputs of the other scales,
DummyData maps), moved to another input size.

Each tied constant v of an input extent D becomes (v - 1) * (S - 1) / (D - 1) + 1 at the new
extent S (Caffe's align-corners relation), heights after the first input's height and widths
after its width; constants under a sixteenth of the input (kernel-sized inputs such as the embs
net's 13x13 position patch) stay. A size at which a tied constant would not be whole is refused
with the nearest sizes that work. `run`, `export` and `time` do the same with --input-shape.
"""
import re

from segaware_caffe.tools.common import (UsageError, add_force_argument, add_variable_arguments,
                                         check_new_file, parse_input_shapes, variables_from)


def add_arguments(parser):
    parser.add_argument("prototxt", help="deploy net (.prototxt, may be a ${VAR} template)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--size", metavar="H[xW]",
                      help="new height and width of the first input (one number: square)")
    size.add_argument("--input-shape", action="append", metavar="NAME=N,C,H,W",
                      help="new shape of an input (repeatable); the first input's height and width "
                           "move the tied sizes")
    parser.add_argument("-o", "--output", required=True, help="the resized .prototxt")
    add_variable_arguments(parser)
    add_force_argument(parser, "an existing output file")


def parse_size(text):
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+)\s*)?", text or "")
    if not match:
        raise UsageError(f"--size expects HEIGHT or HEIGHTxWIDTH, got {text!r}")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) else height
    if height < 1 or width < 1:
        raise UsageError(f"--size must be at least 1x1, got {text!r}")
    return height, width


def run(args):
    from segaware_caffe import caffe_proto
    from segaware_caffe.canonical import declared_inputs, read_net_source
    from segaware_caffe.resize import main_input_size, resize_deploy, resize_to_inputs

    check_new_file(args.output, args.force)
    source = read_net_source(args.prototxt, variables=variables_from(args))
    before = main_input_size(source.param)
    if args.size:
        resized = resize_deploy(source.param, parse_size(args.size))
    else:
        resized, _ = resize_to_inputs(source.param, parse_input_shapes(args.input_shape))
    caffe_proto.write_net(resized, args.output, overwrite=args.force)
    shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}"
                       for name, shape in declared_inputs(resized).items())
    after = main_input_size(resized)
    print(f"wrote {args.output}: input {before[0]}x{before[1]} -> {after[0]}x{after[1]} "
          f"(height x width); inputs {shapes}")
    return 0
