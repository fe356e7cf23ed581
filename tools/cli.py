"""`segaware-caffe VERB ...`: the caffe binary's verbs and our own.

Each verb lives in ``tools/cmd_<verb>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``.
"""
import argparse
import importlib
import sys

VERBS = {  # verb -> one-line help
    "inspect": "table of a net's layers, blobs and parameters",
    "run": "run a net on an image or array and save its outputs",
    "train": "train with a solver prototxt (like `caffe train`)",
    "test": "score a model (like `caffe test`)",
    "time": "per-layer forward/backward timing (like `caffe time`)",
    "convert": "caffemodel <-> safetensors / state_dict",
    "export": "write a standalone PyTorch module (or ONNX)",
    "demo": "local attention masks and segmentation-aware filtering on a bundled photo",
    "eval": "mean IoU of predicted PNGs against ground truth",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="segaware-caffe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    modules = {}
    for verb, help_text in VERBS.items():
        try:
            module = importlib.import_module(f"segaware_caffe.tools.cmd_{verb}")
        except ModuleNotFoundError as e:
            if e.name != f"segaware_caffe.tools.cmd_{verb}":
                raise
            continue  # verb not available in this build
        modules[verb] = module
        module.add_arguments(sub.add_parser(verb, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return modules[args.verb].run(args) or 0
    except (ValueError, OSError, NotImplementedError) as e:
        # our errors (CaffeFormatError, NetBuildError, ...) carry file/layer context already
        print(f"segaware-caffe {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
