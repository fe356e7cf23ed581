"""segaware-caffe mat2png MAT_DIR --list LIST --out DIR [--images DIR | --root ROOT]: VOC-palette
label PNGs from the score maps MatWrite wrote (ours or the original Caffe's).

For each image of LIST (one id per line, like the `_id.txt` lists MatWrite names its files by, or
`image label` lines whose first path's stem is the id) it reads `MAT_DIR/<id>_blob_<B>.mat` (or
`<id>.mat`): variable `data`, MATLAB dims (W, H, C, N) of the net's N x C x H x W blob. The class
of a pixel is the arg-max over C (a one-channel map holds the classes). The map covers the image
padded bottom/right to crop_size, so it is cropped to the image's own size, read from the header of
`--images DIR/<id>.<ext>` (the JPEG images, or the ground-truth PNGs) or, for `image label` lists,
of ROOT + the image path (ROOT as the data layer's root_folder). `eval --pred OUT` scores them.
"""
import os

from segaware_caffe.tools.common import UsageError, add_force_argument, prepare_output_dir


def add_arguments(parser):
    parser.add_argument("mat_dir", metavar="MAT_DIR",
                        help="folder of .mat score maps (MatWrite's prefix folder)")
    parser.add_argument("--list", required=True,
                        help="list of image ids (or `image label` lines; the id is the image's "
                             "file stem)")
    parser.add_argument("--out", required=True, help="folder for <id>.png (created)")
    parser.add_argument("--images", metavar="DIR",
                        help="folder with an image of each id (<id>.jpg, <id>.png, ...) whose size "
                             "the PNG is cropped to")
    parser.add_argument("--root", default="",
                        help="prefix of the image paths of an `image label` list (the data "
                             "layer's root_folder)")
    parser.add_argument("--blob", type=int, default=0, metavar="I",
                        help="MatWrite bottom index in the file names, <id>_blob_<I>.mat (default 0)")
    add_force_argument(parser, "existing PNGs (and write into a non-empty --out)")


def image_for(entry, args):
    """The image whose size an entry's PNG gets: --images DIR/<id>.<ext>, else ROOT + path."""
    from segaware_caffe.label_maps import find_image

    image_id, token = entry
    if args.images:
        path = find_image(args.images, image_id)
        if path is None:
            raise UsageError(f"--images {args.images}: no image for id {image_id!r} "
                             f"({image_id}.jpg, .png, ...)")
        return path
    if token == image_id:
        raise UsageError(f"{args.list} names images by id only; give --images DIR (the JPEG "
                         f"images or the ground-truth PNGs) so that each map can be cropped to its "
                         f"image")
    path = args.root + token
    if not os.path.isfile(path):
        raise UsageError(f"{args.list}: image {path!r} of id {image_id!r} not found"
                         + ("" if args.root else " (give --root, the data layer's root_folder)"))
    return path


def run(args):
    from segaware_caffe.label_maps import crop_to_image, image_size, mat_file, read_mat_labels, \
        save_label_png
    from segaware_caffe.files import CLI_HINT
    from segaware_caffe.tools.cmd_eval import read_list

    if args.blob < 0:
        raise UsageError(f"--blob must be >= 0, got {args.blob}")
    if not os.path.isdir(args.mat_dir):
        raise UsageError(f"{args.mat_dir}: not a folder")
    entries = read_list(args.list)
    jobs = []
    for entry in entries:          # every input is found before anything is written
        path = mat_file(args.mat_dir, entry[0], args.blob)
        if path is None:
            raise UsageError(f"{args.mat_dir}: no score map for id {entry[0]!r} "
                             f"({entry[0]}_blob_{args.blob}.mat)")
        jobs.append((entry[0], path, image_for(entry, args)))
    prepare_output_dir(args.out, args.force)
    for image_id, path, image in jobs:
        labels = crop_to_image(read_mat_labels(path), image_size(image), where=path)
        save_label_png(labels, os.path.join(args.out, f"{image_id}.png"), overwrite=args.force,
                       hint=CLI_HINT)
    print(f"wrote {len(jobs)} label PNG(s) to {args.out}")
    return 0
