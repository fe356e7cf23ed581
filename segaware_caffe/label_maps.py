"""Label maps between a segmentation net and the VOC tools: score maps (a net output, or the .mat
files MatWrite writes) -> class indices -> palette PNGs cropped to each image, and back.

The released test nets pad every image bottom/right to crop_size (the image with the mean, the
label with 255) and MatWrite stores the whole padded score map, as MATLAB dims (W, H, C, N) of
the NCHW blob. The image's own pixels are therefore the top-left H x W of the map, which is the
crop every writer here applies. The class of a pixel is the channel with the highest score (the
first one on ties, like MATLAB's max); a one-channel map holds the classes themselves.

Importing this module loads neither torch nor Pillow (the command line's start-up stays short).
"""
import os

import numpy as np

from .errors import SegawareError
from .files import API_HINT, open_new

PNG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp", ".gif")


class LabelMapError(SegawareError, ValueError):
    """A score or label map that cannot become a label PNG (wrong rank, too small for its
    image, classes outside 0..255); the message names the file or blob."""


def voc_palette(count=256):
    """The PASCAL VOC colour map: the bits of the class index interleaved into R, G, B from the
    most significant bit down. Returns `count` (r, g, b) rows as a uint8 array."""
    palette = np.zeros((count, 3), np.uint8)
    for index in range(count):
        value, rgb = index, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        palette[index] = rgb
    return palette


def labels_from_scores(scores, where="scores"):
    """Class indices (H x W int64) of a C x H x W score map: the arg-max over channels (first on
    ties), or for C = 1 the rounded values themselves."""
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise LabelMapError(f"{where}: expected a C x H x W score map, got shape {scores.shape}")
    if scores.shape[0] == 1:
        return np.rint(scores[0]).astype(np.int64)
    return scores.argmax(axis=0).astype(np.int64)


def crop_to_image(labels, size, where="label map"):
    """The top-left `size` = (height, width) of a map the net padded bottom/right."""
    height, width = int(size[0]), int(size[1])
    if labels.shape[0] < height or labels.shape[1] < width:
        raise LabelMapError(f"{where}: the map is {labels.shape[1]}x{labels.shape[0]} (width x "
                            f"height), smaller than its image, {width}x{height}; the net must see "
                            f"the whole image (a crop_size of at least {max(height, width)})")
    return labels[:height, :width]


def save_label_png(labels, path, *, overwrite=False, hint=API_HINT):
    """An H x W integer array (0..255) as a palette PNG with the VOC colours; an existing file
    is replaced only with `overwrite`."""
    from PIL import Image

    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise LabelMapError(f"{path}: labels span {labels.min()}..{labels.max()}, a palette PNG "
                            f"holds 0..255")
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    image.putpalette(voc_palette().ravel().tolist())
    with open_new(path, overwrite=overwrite, hint=hint) as f:
        image.save(f, format="PNG")
    return os.fspath(path)


def read_label_png(path):
    """Class indices (H x W int64) of a label PNG: palette indices (VOC style) or grey values."""
    from .data.images import ImageReadError, open_image

    with open_image(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ImageReadError(path, f"expected a palette or greyscale PNG of class indices, "
                                       f"got mode {image.mode}")
        return np.asarray(image, dtype=np.int64)


def image_size(path):
    """(height, width) of an image file, from its header."""
    from .data.images import open_image

    with open_image(path, load=False) as image:
        return image.height, image.width


def read_mat_labels(path, item=0):
    """Class indices of item `item` of the score map in a MatWrite .mat file (uncropped)."""
    from .layers.mat_io import read_mat_blob

    blob = read_mat_blob(path)
    if not 0 <= item < blob.shape[0]:
        raise LabelMapError(f"{path}: holds {blob.shape[0]} item(s), item {item} asked for")
    return labels_from_scores(blob[item], where=os.fspath(path))


def mat_file(folder, name, blob=0):
    """The file MatWrite writes for `name` and bottom `blob` (`<name>_blob_<i>.mat`), or, when
    that is absent, `<name>.mat`; None when neither exists."""
    for candidate in (f"{name}_blob_{blob}.mat", f"{name}.mat"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def find_image(folder, image_id, extensions=PNG_EXTENSIONS):
    """The file `<folder>/<image_id><ext>` for the first extension that exists, or None."""
    for ext in extensions:
        path = os.path.join(folder, image_id + ext)
        if os.path.isfile(path):
            return path
    return None
