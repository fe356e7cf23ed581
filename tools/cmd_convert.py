"""segaware-caffe convert NET.prototxt WEIGHTS.caffemodel -o model.safetensors (or .pt)
segaware-caffe convert NET.prototxt model.safetensors --to-caffemodel -o back.caffemodel"""
from segaware_caffe.tools.common import UsageError, add_variable_arguments, int32, variables_from


def add_net_arguments(parser):
    """Options that pick the net a prototxt describes (shared by convert and export)."""
    add_variable_arguments(parser)
    parser.add_argument("--phase", choices=("train", "test"), default=None,
                        help="net phase used to filter layers (default: test)")
    parser.add_argument("--stage", action="append", default=None, help="net stage (repeatable)")
    parser.add_argument("--level", type=int32, default=None, help="net level")


def add_arguments(parser):
    parser.add_argument("prototxt", help="net definition (.prototxt)")
    parser.add_argument("weights", help=".caffemodel, or .safetensors/.pt with --to-caffemodel")
    parser.add_argument("-o", "--output", required=True,
                        help="output file: .safetensors or .pt, or .caffemodel with --to-caffemodel")
    parser.add_argument("--to-caffemodel", action="store_true",
                        help="convert named tensors back into a .caffemodel")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    add_net_arguments(parser)


def run(args):
    from segaware_caffe.converters import convert_caffemodel, convert_to_caffemodel

    variables = variables_from(args)
    if args.to_caffemodel:
        _, notes = convert_to_caffemodel(args.prototxt, args.weights, args.output,
                                         variables=variables, phase=args.phase, stages=args.stage,
                                         level=args.level, overwrite=args.force)
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {args.output}")
        return 0
    if args.weights.lower().endswith((".safetensors", ".pt", ".pth")):
        raise UsageError(f"{args.weights} holds named tensors; add --to-caffemodel to write a .caffemodel")
    metadata, ignored = convert_caffemodel(
        args.prototxt, args.weights, args.output, variables=variables, phase=args.phase or "test",
        stages=tuple(args.stage or ()), level=args.level or 0, overwrite=args.force)
    blobs = sum(len(layer["blobs"]) for layer in metadata["layers"])
    if ignored:
        print(f"note: {len(ignored)} layer(s) of {args.weights} are not in the net and were left "
              f"out (as Caffe ignores them): {', '.join(ignored)}")
    print(f"wrote {args.output}: {blobs} tensor(s) from {len(metadata['layers'])} layer(s)")
    return 0
