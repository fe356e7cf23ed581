"""Regenerate caffe_proto/caffe_pb2.py from caffe_proto/caffe.proto.

    python tools/gen_caffe_pb2.py            # rewrite caffe_pb2.py
    python tools/gen_caffe_pb2.py --check    # exit 1 if caffe_pb2.py is out of date

Needs grpcio-tools (it bundles protoc): pip install grpcio-tools
"""
import argparse
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(REPO, "caffe_proto")
PROTO = os.path.join(PROTO_DIR, "caffe.proto")
TARGET = os.path.join(PROTO_DIR, "caffe_pb2.py")


def protoc_main():
    """grpc_tools' protoc entry point, or a RuntimeError saying how to get it."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise RuntimeError("grpcio-tools is not installed, so protoc is unavailable; "
                           "install it with `pip install grpcio-tools`") from None
    return protoc.main


def run_protoc(args):
    """Run protoc with args (list of str, without argv[0]); raise RuntimeError on failure."""
    main = protoc_main()
    from grpc_tools import protoc
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = main(["protoc", f"-I{include}", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed (exit {code}) on: {' '.join(args)}")


def generate(out_dir):
    """Compile caffe.proto into out_dir; returns the path of the generated caffe_pb2.py."""
    run_protoc([f"-I{PROTO_DIR}", f"--python_out={out_dir}", PROTO])
    return os.path.join(out_dir, "caffe_pb2.py")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare; exit 1 when caffe_pb2.py differs from a fresh build")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(tmp)
            with open(fresh, "rb") as f:
                new = f.read()
            with open(TARGET, "rb") as f:
                old = f.read()
            if args.check:
                if new != old:
                    print(f"{TARGET} is out of date; run python tools/gen_caffe_pb2.py",
                          file=sys.stderr)
                    return 1
                print(f"{TARGET} is up to date")
                return 0
            if new != old:
                shutil.copyfile(fresh, TARGET)
                print(f"wrote {TARGET}")
            else:
                print(f"{TARGET} already up to date")
    except RuntimeError as e:
        print(f"gen_caffe_pb2: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
