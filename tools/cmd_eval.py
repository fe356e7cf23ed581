"""segaware-caffe eval --pred DIR --gt DIR --list FILE: mean IoU like the VOC devkit.

Predictions are label PNGs (`<id>.png`, as `test --png` and `mat2png` write them) or the score
maps MatWrite writes (`<id>_blob_0.mat`), whose class per pixel is the arg-max over channels,
cropped top-left to the ground truth's size (the net padded the image bottom/right).

One confusion matrix is accumulated over all images (gt rows, prediction columns); pixels whose
ground truth is the ignore label are skipped. Per class IoU = TP / (TP + FP + FN). A class that
appears neither in the ground truth nor in the predictions (TP + FP + FN = 0) has no IoU: it is
reported as nan and left out of the mean (the devkit would count it as 0 and drag the mean down
on subsets; on full VOC val every class is present, so both conventions agree there).
"""
import os
from dataclasses import dataclass

import numpy as np

from segaware_caffe.tools.common import UsageError

MAX_CLASSES = 4096   # a 4096 x 4096 confusion matrix of int64 counts is 128 MiB
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


@dataclass
class IoUResult:
    confusion: np.ndarray      # (classes, classes) int64 pixel counts, rows = ground truth
    iou: np.ndarray            # per class, nan where the class is in neither gt nor prediction
    images: int

    @property
    def mean_iou(self):
        present = ~np.isnan(self.iou)
        return float(self.iou[present].mean()) if present.any() else float("nan")

    @property
    def pixel_accuracy(self):
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")


def _data_error(message):
    from segaware_caffe.data.images import DataError
    return DataError(message)


def read_list(list_file):
    """[(image id, first token)] of a list file: one id per line (voc_val_id.txt), or
    `image label` lines whose first path's file stem is the id (voc_val.txt)."""
    entries = []
    try:
        with open(list_file, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if fields:
                    entries.append((os.path.splitext(os.path.basename(fields[0]))[0], fields[0]))
    except UnicodeDecodeError as e:
        raise _data_error(f"{list_file}: not a text list of image ids (byte {e.start} is not "
                          f"UTF-8)") from None
    if not entries:
        raise _data_error(f"{list_file}: no image ids")
    return entries


def read_ids(list_file):
    """Image ids from a list file (see read_list)."""
    return [image_id for image_id, _ in read_list(list_file)]


def read_label_png(path):
    """Class indices of a label PNG: palette indices (VOC style) or grey values."""
    from segaware_caffe.label_maps import read_label_png as read
    return read(path)


def confusion_matrix(gt, pred, num_classes, ignore_label, where="image"):
    if gt.shape != pred.shape:
        raise _data_error(f"{where}: prediction is {pred.shape[1]}x{pred.shape[0]}, ground truth "
                          f"{gt.shape[1]}x{gt.shape[0]}")
    valid = gt != ignore_label if ignore_label is not None else np.ones(gt.shape, bool)
    gt, pred = gt[valid], pred[valid]
    for what, values in (("ground truth", gt), ("prediction", pred)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            raise _data_error(f"{where}: {what} has label {int(values[bad][0])} outside "
                              f"0..{num_classes - 1}"
                              + (f" (ignore label {ignore_label})" if ignore_label is not None else ""))
    return np.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def prediction_file(pred_dir, image_id):
    """The prediction of an image: `<id>.png` (label PNG), else the MatWrite score map
    `<id>_blob_0.mat` or `<id>.mat`; None when there is none."""
    from segaware_caffe.label_maps import mat_file

    png = os.path.join(pred_dir, f"{image_id}.png")
    return png if os.path.isfile(png) else mat_file(pred_dir, image_id)


def read_prediction(path, size):
    """Class indices of a prediction file; a .mat score map is cropped to the ground truth's
    `size` (the net padded the image bottom/right)."""
    from segaware_caffe.label_maps import LabelMapError, crop_to_image, read_mat_labels

    if not path.endswith(".mat"):
        return read_label_png(path)
    try:
        return crop_to_image(read_mat_labels(path), size, where=path)
    except LabelMapError as e:
        raise _data_error(str(e)) from None


def evaluate(pred_dir, gt_dir, ids, *, num_classes=21, ignore_label=255):
    """IoUResult of the predictions in `pred_dir` (label PNGs, or MatWrite .mat score maps)
    against the label PNGs of `gt_dir`, over the image `ids`."""
    from segaware_caffe import budget
    # the matrix, and per image the bincount and its reshaped sum (int64 counts each)
    budget.check_size(3 * num_classes * num_classes * 8,
                      f"the {num_classes} x {num_classes} confusion matrix")
    confusion = np.zeros((num_classes, num_classes), np.int64)
    found = {i: prediction_file(pred_dir, i) for i in ids}
    missing = [i for i, path in found.items() if path is None]
    if missing:
        raise _data_error(f"{pred_dir}: no prediction for {len(missing)} of {len(ids)} ids "
                          f"(first: {missing[0]}.png, or the score map {missing[0]}_blob_0.mat)")
    for image_id in ids:
        gt_path = os.path.join(gt_dir, f"{image_id}.png")
        gt = read_label_png(gt_path)
        pred = read_prediction(found[image_id], gt.shape)
        confusion += confusion_matrix(gt, pred, num_classes, ignore_label, where=gt_path)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return IoUResult(confusion, iou, len(ids))


def format_table(result, class_names=None):
    """Per-class rows (name, ground-truth pixels, predicted pixels, IoU in %), right-aligned
    numbers, then the mean IoU."""
    n = len(result.iou)
    names = class_names if class_names and len(class_names) == n else [str(c) for c in range(n)]
    gt_pixels, pred_pixels = result.confusion.sum(1), result.confusion.sum(0)
    rows = [(name, f"{g:,}", f"{p:,}", "nan" if np.isnan(v) else f"{100 * v:.2f}")
            for name, g, p, v in zip(names, gt_pixels, pred_pixels, result.iou)]
    header = ("class", "gt pixels", "predicted", "IoU (%)")
    mean = ("mean IoU", "", "", f"{100 * result.mean_iou:.2f}")
    widths = [max(len(row[i]) for row in rows + [header, mean]) for i in range(4)]

    def line(cells):
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])
    lines = [line(header)] + [line(row) for row in rows]
    lines += ["-" * len(lines[0]), line(mean)]
    lines.append(f"({result.images} images, pixel accuracy {100 * result.pixel_accuracy:.2f}%; "
                 f"classes absent from gt and prediction are nan and not averaged)")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--pred", required=True,
                        help="folder of predicted label PNGs (<id>.png) or MatWrite score maps "
                             "(<id>_blob_0.mat)")
    parser.add_argument("--gt", required=True, help="folder of ground-truth label PNGs (<id>.png)")
    parser.add_argument("--list", required=True, help="list file of image ids (or `image label` lines)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--ignore", type=int, default=255, help="ground-truth label to skip (default 255)")


def run(args):
    if not 1 <= args.num_classes <= MAX_CLASSES:
        raise UsageError(f"--num-classes must be in 1..{MAX_CLASSES} (the confusion matrix holds "
                         f"classes x classes counts), got {args.num_classes}")
    result = evaluate(args.pred, args.gt, read_ids(args.list), num_classes=args.num_classes,
                      ignore_label=args.ignore)
    print(format_table(result, list(VOC_CLASSES) if args.num_classes == len(VOC_CLASSES) else None))
    return 0
