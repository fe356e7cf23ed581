"""Reading and resizing images the way Caffe's OpenCV calls do (cv::imread, cv::resize).

OpenCV is not a dependency, so decoding goes through Pillow and resizing through torch:
- `read_image` returns uint8 arrays in OpenCV's layout: H x W x 3 in **BGR** order for colour,
  H x W for grayscale. A palette PNG read as grayscale becomes its luminance (like
  cv::IMREAD_GRAYSCALE), not its palette indices. Pillow's grayscale conversion uses the same
  ITU-R 601 weights as OpenCV (0.299, 0.587, 0.114) but its own integer rounding, so a converted
  colour pixel may differ by 1 level. JPEG decoders may differ by a level or so as well.
- `resize_bilinear` is cv::INTER_LINEAR: half-pixel centres, no antialiasing (Pillow's BILINEAR
  widens its filter when shrinking, which OpenCV does not do, so it is not used). OpenCV computes
  8-bit results with 11-bit fixed-point weights; we compute in float and round, so a pixel may
  differ by 1 level.
- `resize_nearest` is cv::INTER_NEAREST: source index floor(dst * (1 / (dst_size / src_size))).
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class DataError(OSError):
    """An item of a data layer's list cannot be read or batched. The message names the layer,
    the file and the list line."""


def read_image(path, color):
    """uint8 array: H x W x 3 (BGR) when `color`, else H x W. Raises OSError if unreadable."""
    with Image.open(path) as image:
        if color:
            rgb = np.asarray(image.convert("RGB"))
            return np.ascontiguousarray(rgb[:, :, ::-1])
        return np.array(image.convert("L"))  # a writable copy


def is_palette_image(path):
    with Image.open(path) as image:
        return image.mode == "P"


def _as_nchw(array):
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if array.ndim == 2:
        return tensor[None, None]
    return tensor.permute(2, 0, 1)[None]


def _from_nchw(tensor, ndim):
    if ndim == 2:
        return tensor[0, 0].numpy()
    return np.ascontiguousarray(tensor[0].permute(1, 2, 0).numpy())


def resize_bilinear(array, height, width):
    """cv::resize(..., Size(width, height), INTER_LINEAR) of an H x W [x C] array. uint8 input
    gives uint8 output (rounded, saturated); float input stays float64."""
    if array.shape[:2] == (height, width):
        return array
    source = _as_nchw(array).to(torch.float64)
    resized = F.interpolate(source, size=(height, width), mode="bilinear", align_corners=False)
    if array.dtype == np.uint8:
        resized = resized.round().clamp(0, 255).to(torch.uint8)
    return _from_nchw(resized, array.ndim)


def _nearest_index(source_size, size):
    # OpenCV's double arithmetic: floor(x * (1 / (dst / src))), clipped to the last index
    step = 1.0 / (size / source_size)
    index = np.floor(np.arange(size, dtype=np.float64) * step).astype(np.int64)
    return np.minimum(index, source_size - 1)


def resize_nearest(array, height, width):
    """cv::resize(..., Size(width, height), INTER_NEAREST) of an H x W [x C] array."""
    if array.shape[:2] == (height, width):
        return array
    rows = _nearest_index(array.shape[0], height)
    cols = _nearest_index(array.shape[1], width)
    return np.ascontiguousarray(array[rows[:, None], cols[None, :]])
