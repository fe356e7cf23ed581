"""segaware-caffe export NET.prototxt [WEIGHTS] --python model.py [--onnx model.onnx]

--python writes a standalone PyTorch module; with WEIGHTS (.caffemodel) the tensors are written
next to it as <model>.safetensors, which the module's load() reads by default (a .safetensors or
.pt WEIGHTS file stays where it is: pass its path to load()). --onnx writes ONNX with the given
(or filler) weights, in standard ONNX operators (the segmentation-aware layers included), checked
in onnxruntime against the net before it is written unless --no-verify. --input-shape
NAME=N,C,H,W builds at another size; deploy nets that hard-code sizes tied to their input (the
released vgg/res/embs) are moved to it (see `segaware-caffe resize`). Inputs no layer reads (the
vgg deploy net's `label`) are left out of the module's arguments."""
import os

from segaware_caffe.errors import NetBuildError
from segaware_caffe.tools.cmd_convert import add_net_arguments
from segaware_caffe.files import CLI_HINT, write_new
from segaware_caffe.tools.common import (UsageError, add_input_shape_argument, check_new_file,
                                         parse_input_shapes, sized_net, variables_from)


def add_arguments(parser):
    parser.add_argument("prototxt", help="net definition (.prototxt)")
    parser.add_argument("weights", nargs="?", help=".caffemodel, .safetensors or .pt (optional)")
    parser.add_argument("--python", metavar="FILE", help="write the module source here")
    parser.add_argument("--onnx", metavar="FILE", help="write ONNX here")
    parser.add_argument("--class-name", help="name of the generated class (default: from the net name)")
    add_input_shape_argument(parser, "build (and ONNX-trace) with this input shape")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running the ONNX graph in onnxruntime against the net")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    add_net_arguments(parser)


def _check_new(path, force):
    if path:
        check_new_file(path, force)


def run(args):
    from segaware_caffe.converters import caffemodel as cm
    from segaware_caffe.converters.onnx_export import export_onnx
    from segaware_caffe.converters.python_export import build_net, python_source

    if not args.python and not args.onnx:
        raise UsageError("nothing to write: give --python FILE and/or --onnx FILE")
    tensor_file = bool(args.weights) and args.weights.lower().endswith((".safetensors", ".pt", ".pth"))
    beside = None   # the tensors of a .caffemodel, written next to the module
    if args.weights and not tensor_file and args.python:
        beside = os.path.splitext(os.path.basename(args.python))[0] + ".safetensors"
    for path in (args.python, args.onnx,
                 beside and os.path.join(os.path.dirname(os.path.abspath(args.python)), beside)):
        _check_new(path, args.force)
    variables = variables_from(args)
    phase = args.phase or "test"
    source = sized_net(args.prototxt, variables, parse_input_shapes(args.input_shape))
    net = build_net(source, variables=variables, phase=phase, stages=tuple(args.stage or ()),
                    level=args.level or 0)
    default_weights = None
    if args.weights:
        if tensor_file:
            tensors, metadata = cm.load_tensors(args.weights)
        else:
            tensors, metadata, ignored = cm.caffemodel_to_tensors(
                net, args.weights, prototxt=args.prototxt, variables=variables, phase=phase,
                stages=tuple(args.stage or ()), level=args.level or 0)
            if beside:
                default_weights = beside
                target = os.path.join(os.path.dirname(os.path.abspath(args.python)), beside)
                cm.save_tensors(target, tensors, metadata, overwrite=args.force)
                print(f"wrote {target}")
        try:
            tensors, _ = cm.net_tensors(net, tensors)
        except NetBuildError as e:   # say which file the tensors came from
            raise NetBuildError(f"{args.weights}: {e}") from None
        net.load_state_dict({f"layers.{k}": v for k, v in tensors.items()}, strict=False)
    note = f"Source: {os.path.basename(args.prototxt)} (sha256 {cm.prototxt_sha256(args.prototxt)[:16]})"
    if variables:
        note += f", variables {variables}"
    export = python_source(net, class_name=args.class_name, source_note=note + ".",
                           default_weights=default_weights)
    if args.python:
        write_new(args.python, export.source, overwrite=args.force, hint=CLI_HINT)
        modules = [layer for layer in export.layers if layer.how == "module"]
        print(f"wrote {args.python}: class {export.class_name}, {len(export.layers)} layer(s), "
              f"{len(modules)} as segaware_caffe modules; forward({', '.join(export.inputs)})")
        if tensor_file:
            print(f"its weights: load({args.weights!r}) (the module names no weights file)")
    if args.onnx:
        result = export_onnx(net, export, args.onnx, opset=args.opset, overwrite=args.force,
                             hint=CLI_HINT, verify=not args.no_verify)
        print(f"wrote {args.onnx}: inputs {', '.join(result.inputs) or 'none'}; outputs "
              f"{', '.join(result.outputs)}")
        for blob, name in result.renamed.items():
            print(f"  output {blob!r} is named {name!r} (an input has its name)")
        if result.left_out:
            print(f"  left out {', '.join(map(repr, result.left_out))}: input(s) passed through "
                  f"unchanged")
        if result.verified:
            print(f"  onnxruntime matches the net: max relative error "
                  f"{max(result.errors.values(), default=0.0):.1e}")
        else:
            print(f"  not verified: {result.unverified}")
    return 0
