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

from ..errors import LayerSetupError


class DataError(OSError):
    """An item of a data layer's list cannot be read or batched. The message names the layer,
    the file and the list line."""


class DataSetupError(LayerSetupError, DataError):
    """A data file found unreadable or malformed while the net is built: a LayerSetupError (the
    net cannot be built) that is also a DataError (it names the file, and the record of a
    database)."""


def data_setup_error(ctx, error):
    """DataSetupError for the layer of `ctx` from a DataError whose message may already start
    with the layer's name and type."""
    message, label = str(error), f"{ctx.name} ({ctx.type}): "
    return DataSetupError(ctx.name, ctx.type, message.removeprefix(label))


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


def _linear_taps(source_size, size):
    """OpenCV's INTER_LINEAR taps along one axis: source indices (i0, i1) and 11-bit fixed-point
    weights (w0, w1) per output index. The coordinate is (d + 0.5) * (src / dst) - 0.5 in float32,
    its fraction rounded to a multiple of 1/2048."""
    scale = 1.0 / (np.float64(size) / source_size)
    position = ((np.arange(size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = (position - first.astype(np.float32)).astype(np.float32)
    return first, fraction


def _fixed_weights(fraction):
    one = np.float32(2048)
    return (np.rint((np.float32(1) - fraction) * one).astype(np.int64),
            np.rint(fraction * one).astype(np.int64))


def cv_resize_linear_u8(array, height, width):
    """cv::resize(..., Size(width, height), INTER_LINEAR) of an 8-bit H x W [x C] array, bit for
    bit as OpenCV computes it: a horizontal pass with 11-bit weights into integers, then the
    vertical pass OpenCV's vector code does, which drops 4 bits of each row before weighting and
    rounds twice; an exact 2x reduction in both axes is OpenCV's 2x2 average instead. (A float
    bilinear resize differs from OpenCV by one level on some pixels.)"""
    if array.dtype != np.uint8:
        raise TypeError(f"cv_resize_linear_u8 needs uint8 input, got {array.dtype}")
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize to {height}x{width}")
    image = array if array.ndim == 3 else array[:, :, None]
    rows, cols, channels = image.shape
    if (rows, cols) == (height, width):
        return array.copy()
    if rows == 2 * height and cols == 2 * width:
        blocks = image.astype(np.int32).reshape(height, 2, width, 2, channels).sum(axis=(1, 3))
        out = ((blocks + 2) >> 2).astype(np.uint8)
        return out if array.ndim == 3 else out[:, :, 0]
    # horizontal: outside the image the edge column is taken with weight 1
    x0, fx = _linear_taps(cols, width)
    outside = (x0 < 0) | (x0 >= cols - 1)
    fx[outside] = 0
    x0 = np.clip(x0, 0, cols - 1)
    x1 = np.minimum(x0 + 1, cols - 1)
    ax0, ax1 = _fixed_weights(fx)
    pixels = image.astype(np.int64)
    horizontal = pixels[:, x0] * ax0[None, :, None] + pixels[:, x1] * ax1[None, :, None]
    # vertical: the weights are kept outside the image, both taps clamped to the edge row
    y0, fy = _linear_taps(rows, height)
    by0, by1 = _fixed_weights(fy)
    top = horizontal[np.clip(y0, 0, rows - 1)] >> 4
    bottom = horizontal[np.clip(y0 + 1, 0, rows - 1)] >> 4
    mixed = ((top * by0[:, None, None]) >> 16) + ((bottom * by1[:, None, None]) >> 16)
    out = np.clip((mixed + 2) >> 2, 0, 255).astype(np.uint8)
    return out if array.ndim == 3 else out[:, :, 0]


def decode_image_bytes(data, mode="native"):
    """An encoded image (JPEG, PNG, ...) as cv::imdecode gives it, in OpenCV's uint8 layout:
    mode "native" (flag -1, IMREAD_UNCHANGED: grayscale stays 1 channel, alpha is kept as a 4th
    channel, a palette image becomes BGR), "color" (3 channels, BGR) or "gray" (1 channel).
    Returns H x W x C. Raises OSError when the bytes do not decode or hold more than 8 bits."""
    import io
    with Image.open(io.BytesIO(bytes(data))) as image:
        if mode == "gray" and image.format == "JPEG":
            image.draft("L", image.size)   # libjpeg's own grayscale output, as OpenCV asks for
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            raise OSError(f"the image has {image.mode} pixels (more than 8 bits); Caffe's data "
                          f"transformer takes 8-bit images only")
        if mode == "gray":
            return np.array(image.convert("L"))[:, :, None]
        if mode == "color":
            return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        if image.mode in ("L", "1"):
            return np.array(image.convert("L"))[:, :, None]
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info)
        if has_alpha:
            rgba = np.asarray(image.convert("RGBA"))
            return np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])
        return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
