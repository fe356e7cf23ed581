"""segaware-caffe run NET.prototxt --weights W --input data=img.jpg [--save out.png]: run a net on
images or arrays and save its outputs.

Images are read as BGR (like OpenCV), mean-subtracted (--mean B,G,R; default the configs'
104.008,116.669,122.675) and fed as 1x3xHxW; .npy arrays are fed as they are (a 3-D array gets a
batch axis). The net's declared input shapes are replaced by the fed ones (with --pad, images are
instead padded bottom/right with the mean to the declared size, as the released test nets do, and
.png outputs are cropped back to the image). Inputs not given are fed zeros (with a note). Outputs are saved as .npy (raw) or .png (per pixel
argmax over channels of item 0, with the PASCAL VOC palette).

Deploy nets that hard-code sizes tied to their input (Interp sizes, Tile counts, the inputs of
other scales: the released vgg/res/embs nets) are moved to the size of the fed image (see
`segaware-caffe resize`), or to --input-shape, to which images are then padded.
"""
import os
import sys

import numpy as np

from segaware_caffe.canonical import canonical_net
from segaware_caffe.files import CLI_HINT, open_new
from segaware_caffe.label_maps import labels_from_scores, save_label_png, voc_palette  # noqa: F401
from segaware_caffe.tools.common import (UsageError, add_device_arguments, add_force_argument,
                                         add_input_shape_argument, add_variable_arguments,
                                         check_new_file, device_from_args, parse_assignments,
                                         parse_input_shapes, parse_variables, sized_net)

DEFAULT_MEAN = "104.008,116.669,122.675"


def add_arguments(parser):
    parser.add_argument("model", help="net .prototxt (deploy)")
    parser.add_argument("--weights", help=".caffemodel with the learned parameters")
    parser.add_argument("--input", action="append", default=[], metavar="BLOB=FILE",
                        help="feed an image (.jpg, .png, ...) or a .npy array to input BLOB; "
                             "repeat for nets with several inputs")
    add_variable_arguments(parser)
    parser.add_argument("--output", action="append", default=[], metavar="BLOB",
                        help="blob to save or show (repeatable; default: the net outputs)")
    parser.add_argument("--save", action="append", default=[], metavar="FILE",
                        help="where to save each --output, in order: .npy (raw array) or .png "
                             "(argmax over channels, VOC palette)")
    parser.add_argument("--mean", default=DEFAULT_MEAN, metavar="B,G,R",
                        help=f"mean subtracted from images, BGR order (default {DEFAULT_MEAN})")
    parser.add_argument("--pad", action="store_true",
                        help="pad images (bottom/right, with the mean) to the declared input size "
                             "instead of resizing the net's inputs")
    add_input_shape_argument(parser, "build the net at this input shape and pad images to it "
                                     "(bottom/right, with the mean; .png outputs are cropped back)")
    parser.add_argument("--phase", choices=("test", "train"), default="test")
    add_device_arguments(parser, default="cpu")
    add_force_argument(parser, "existing --save files")
    parser.add_argument("--max-image-pixels", type=int, metavar="N",
                        help="largest image (width x height) read, a guard against decompression "
                             "bombs (default $SEGAWARE_MAX_IMAGE_PIXELS or 67108864)")


def read_inputs(source, phase):
    """The inputs some layer other than Silence reads (vgg deploy's `label` is read by none)."""
    param = canonical_net(source, phase=phase).param
    return {b for layer in param.layer if layer.type != "Silence" for b in layer.bottom}


def parse_mean(text):
    try:
        mean = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--mean must be comma-separated numbers (B,G,R), got {text!r}") from None
    if len(mean) not in (1, 3):
        raise UsageError(f"--mean takes 1 or 3 values (B,G,R), got {len(mean)}")
    return mean


def load_input(path, mean, max_pixels=None):
    """A float32 N x C x H x W array from a .npy file (3-D gets a batch axis) or an image (BGR,
    minus `mean`). Returns (array, is_image)."""
    from segaware_caffe.data import DataError, read_image
    from segaware_caffe.data.arrays import read_npy

    if not os.path.isfile(path):
        raise DataError(f"input file {path} does not exist")
    if path.lower().endswith(".npy"):
        array = read_npy(path)
        if array.ndim == 3:
            array = array[None]
        return np.asarray(array, np.float32), False
    bgr = read_image(path, color=True, max_pixels=max_pixels).astype(np.float32)
    data = bgr - np.asarray(np.broadcast_to(mean, (3,)), np.float32)
    return np.ascontiguousarray(data.transpose(2, 0, 1)[None]), True


def zeros_like_declared(name, declared, feeds, arrays):
    """Zeros for an input the user did not give (e.g. the unused `label` input of the vgg
    deploy net): its declared shape, with the spatial size of the first fed input when both
    were declared with the same spatial size."""
    from segaware_caffe import budget
    shape = tuple(declared[name])
    for fed in feeds:
        fed_declared, fed_shape = tuple(declared[fed]), arrays[fed].shape
        if len(shape) == 4 and len(fed_declared) == 4 and shape[2:] == fed_declared[2:]:
            shape = shape[:2] + tuple(fed_shape[2:])
            break
    # the declared shape comes from the prototxt: checked before numpy is asked for it
    budget.check_size(budget.nbytes(shape, 4), f"zeros for input {name!r} (not given with "
                                               f"--input) of shape {shape}")
    return np.zeros(shape, np.float32)


def pad_to(array, shape, name):
    """Pad an image array (already mean-subtracted, so the mean pads as 0) bottom/right."""
    height, width = array.shape[2:]
    if len(shape) != 4 or shape[2] < height or shape[3] < width:
        raise UsageError(f"--pad: input {name!r} is declared as {shape}, smaller than the "
                         f"{height}x{width} image")
    padded = np.zeros(array.shape[:2] + tuple(shape[2:]), np.float32)
    padded[:, :, :height, :width] = array
    return padded


def save_output(name, array, path, crop=None, overwrite=False):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        with open_new(path, overwrite=overwrite, hint=CLI_HINT) as f:
            np.save(f, array)
    elif ext == ".png":
        if array.ndim != 4:
            raise UsageError(f"{path}: a .png needs a 4-D N x C x H x W blob; {name!r} has shape "
                             f"{array.shape} (save it as .npy)")
        labels = labels_from_scores(array[0], where=name)
        if crop is not None:
            labels = labels[:crop[0], :crop[1]]
        save_label_png(labels, path, overwrite=overwrite, hint=CLI_HINT)
    else:
        raise UsageError(f"{path}: unknown output format {ext or '(none)'}; use .npy or .png")


def run(args):
    import torch
    from segaware_caffe import Net, NetBuildError

    variables = parse_variables(args.set, args.vars)
    feeds = parse_assignments(args.input, "--input")
    mean = parse_mean(args.mean)
    device = device_from_args(args) or "cpu"
    if args.max_image_pixels is not None and args.max_image_pixels <= 0:
        raise UsageError(f"--max-image-pixels must be > 0, got {args.max_image_pixels}")
    for path in args.save:   # before any work: an existing file stays as it is without --force
        check_new_file(path, args.force)
    explicit = parse_input_shapes(args.input_shape)
    if explicit and args.pad:
        raise UsageError("--pad pads images to the declared input size, --input-shape to the size "
                         "it gives; use one of them")
    # with --input-shape the net is moved to that size first (and images are padded to it)
    source = sized_net(args.model, variables, explicit)
    declared = canonical_net(source, phase=args.phase).inputs()
    for name, shape in declared.items():
        # the net would refuse it too, but zeros for an input not given are made before the net
        if any(int(d) < 0 for d in shape):
            raise NetBuildError(f"{args.model}: input blob {name!r} is declared with a negative "
                                f"dimension, shape {tuple(shape)}")
    unknown = [name for name in feeds if name not in declared]
    if unknown:
        raise UsageError(f"{args.model}: {unknown[0]!r} is not an input of the net (inputs: "
                         f"{', '.join(declared) or 'none'})")
    pad = args.pad or bool(explicit)
    arrays, crops = {}, {}   # crops: padded input size -> image size, for .png outputs
    for name, path in feeds.items():
        array, is_image = load_input(path, mean, args.max_image_pixels)
        if is_image and pad:
            image_size = array.shape[2:]
            array = pad_to(array, declared[name], name)
            crops.setdefault(array.shape[2:], image_size)
        elif explicit and tuple(array.shape) != tuple(declared[name]):
            raise UsageError(f"--input {name}: the array has shape {tuple(array.shape)}, the net is "
                             f"built for {tuple(declared[name])} (--input-shape); arrays are fed as "
                             f"they are, only images are padded to it")
        arrays[name] = array
    if not pad and arrays:
        # the net takes the size of what is fed; sizes tied to its first input follow it
        source = sized_net(source, None, {name: a.shape for name, a in arrays.items()})
        fed_declared, declared = declared, canonical_net(source, phase=args.phase).inputs()
    else:
        fed_declared = declared
    for name in declared:
        if name not in arrays:
            arrays[name] = zeros_like_declared(name, fed_declared, feeds, arrays) \
                if not pad and tuple(fed_declared[name]) == tuple(declared[name]) \
                else np.zeros(declared[name], np.float32)
            if name in read_inputs(source, args.phase):
                print(f"note: no --input for {name!r}; fed zeros of shape {arrays[name].shape}",
                      file=sys.stderr)
    try:
        net = Net(source, weights=args.weights, phase=args.phase, device=device,
                  input_shapes=None if pad else {name: a.shape for name, a in arrays.items()})
    except NetBuildError as e:
        if pad:
            raise
        sizes = ", ".join(f"{name} {tuple(shape)}" for name, shape in fed_declared.items())
        raise NetBuildError(f"{e}\n(the net could not be built at the size of the inputs; its "
                            f"declared inputs are {sizes}: --pad pads images to that size, "
                            f"--input-shape NAME=N,C,H,W builds it at another)") from None
    # default: the net outputs, less inputs that nothing consumes (vgg deploy's `label`)
    outputs = args.output or [o for o in net.outputs if o not in net.input_names]
    if args.save and len(args.save) != len(outputs):
        raise UsageError(f"{len(args.save)} --save file(s) for {len(outputs)} output(s) "
                         f"({', '.join(outputs)}); give one --output per --save")
    unknown = [o for o in outputs if o not in net.blob_shapes]
    if unknown:
        raise UsageError(f"{args.model}: no blob named {unknown[0]!r}")
    with torch.no_grad():
        result = net.forward(outputs=outputs, **{k: torch.from_numpy(v) for k, v in arrays.items()})
    for i, name in enumerate(outputs):
        array = result[name].detach().to("cpu", torch.float32).numpy()
        if args.save:
            # outputs at the padded input resolution are cropped back to the image
            crop = crops.get(array.shape[2:]) if array.ndim == 4 else None
            save_output(name, array, args.save[i], crop=crop, overwrite=args.force)
            print(f"{name} {tuple(array.shape)} -> {args.save[i]}")
        else:
            stats = (f"min {array.min():.6g} max {array.max():.6g} mean {array.mean():.6g}"
                     if array.size else "empty")
            print(f"{name} {tuple(array.shape)} {stats}")
    sys.stdout.flush()
    return 0
