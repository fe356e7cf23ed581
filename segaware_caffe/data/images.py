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

Every image of the project (`run` inputs, data layers, `eval` label maps, the demo photo) is read
through `open_image`: the size in the header is checked against a pixel limit before any pixel is
decoded (a few hundred bytes of PNG can claim gigapixels), only the raster formats OpenCV reads
are accepted (no PostScript, which Pillow hands to Ghostscript), and whatever a decoder throws on a
broken or truncated file becomes a DataError naming the file.
"""
import contextlib
import io
import os
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import LayerSetupError, SegawareError


class DataError(SegawareError, OSError):
    """A data file (image, array, list item) cannot be read or batched. The message names the
    file, and for a data layer the layer and the list line."""


class DataSetupError(LayerSetupError, DataError):
    """A data file found unreadable or malformed while the net is built: a LayerSetupError (the
    net cannot be built) that is also a DataError (it names the file, and the record of a
    database)."""


def data_setup_error(ctx, error):
    """DataSetupError for the layer of `ctx` from a DataError whose message may already start
    with the layer's name and type."""
    message, label = str(error), f"{ctx.name} ({ctx.type}): "
    return DataSetupError(ctx.name, ctx.type, message.removeprefix(label))


class ImageReadError(DataError):
    """An image file that cannot be decoded: `path` and `reason` apart, so that a data layer can
    put the file into its own sentence."""

    def __init__(self, path, reason):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


MAX_PIXELS_ENV = "SEGAWARE_MAX_IMAGE_PIXELS"
# 8192 x 8192: far above any dataset image, and its decoded planes stay in the hundreds of MB
DEFAULT_MAX_PIXELS = 1 << 26
# the raster formats cv::imread decodes (Pillow's names)
FORMATS = ("PNG", "JPEG", "JPEG2000", "BMP", "DIB", "PPM", "PFM", "TIFF", "WEBP", "SUN", "GIF")

# Pillow's own bomb check (a process-wide setting) runs inside Image.open, before the size can be
# read; it is lifted for the header read only (and for decoding when a caller raised our limit
# above it), under a lock, so that our limit and our message decide.
_PIL_LIMIT_LOCK = threading.RLock()


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WEBP"))


def _signature(head):
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)


def _registered_formats():
    # FORMATS this Pillow has a decoder for (PFM arrived in Pillow 10, for one)
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


def max_image_pixels():
    """The pixel limit: $SEGAWARE_MAX_IMAGE_PIXELS when set, else DEFAULT_MAX_PIXELS."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value.replace("_", "").replace(",", ""))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise DataError(f"${MAX_PIXELS_ENV} must be a positive number of pixels, got {value!r}")
    return limit


@contextlib.contextmanager
def _pil_limit_lifted(lift):
    if not lift:
        yield
        return
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _describe(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def open_image(source, *, max_pixels=None, load=True, name=None):
    """A Pillow image of `source` (a path, or encoded bytes with `name` for messages), whose
    header size was checked against `max_pixels` (default `max_image_pixels()`) and whose pixels
    are decoded when `load`. Every failure is a DataError naming the file."""
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = name or "<image bytes>"
        stream = io.BytesIO(bytes(source))
    else:
        where = os.fspath(source)
        try:
            stream = open(where, "rb")
        except FileNotFoundError:
            raise ImageReadError(where, "no such image file") from None
        except OSError as e:
            raise ImageReadError(where, f"cannot open the image: {e.strerror or e}") from None
    with stream:
        try:
            with _pil_limit_lifted(True):
                image = Image.open(stream, formats=_registered_formats())
        except Image.UnidentifiedImageError:
            stream.seek(0)
            kind = _signature(stream.read(16))
            if kind:   # the start says what it is, but no decoder accepts the header
                raise ImageReadError(where, f"broken {kind} image header (Pillow's {kind} decoder "
                                            f"rejects it)") from None
            raise ImageReadError(where, f"not an image file of a supported format "
                                        f"({', '.join(FORMATS)})") from None
        except MemoryError:
            raise
        except Exception as e:  # a decoder's parser meeting a broken header: any error type
            raise ImageReadError(where, f"broken image header ({_describe(e)})") from None
        with image:
            width, height = image.size
            pixels = width * height
            if pixels > limit:
                raise ImageReadError(
                    where, f"the image is {width} x {height} = {pixels:,} pixels, over the limit "
                    f"of {limit:,} pixels (a decompression bomb, or a genuine huge image: raise "
                    f"the limit with ${MAX_PIXELS_ENV}, max_pixels=, or --max-image-pixels)")
            if pixels == 0:
                raise ImageReadError(where, f"the image has no pixels ({width} x {height})")
            if load:
                pil_limit = Image.MAX_IMAGE_PIXELS
                try:
                    with _pil_limit_lifted(pil_limit is not None and limit > pil_limit):
                        image.load()
                except MemoryError:
                    raise
                except Exception as e:  # truncated data, broken chunks, decoder errors
                    raise ImageReadError(where, f"broken or truncated {image.format} image "
                                                f"({_describe(e)})") from None
            yield image


def convert_image(image, mode, where):
    """image.convert(mode), a DataError naming the file when Pillow cannot convert its mode."""
    try:
        return image.convert(mode)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageReadError(where, f"cannot convert a {image.mode} image to {mode} "
                                    f"({_describe(e)})") from None


def read_image(source, color, *, max_pixels=None, name=None):
    """uint8 array: H x W x 3 (BGR) when `color`, else H x W, from a path or encoded bytes (`name`
    for messages). Raises DataError (an OSError) naming the file when it is missing, broken,
    truncated, or over the pixel limit."""
    with open_image(source, max_pixels=max_pixels, name=name) as image:
        where = (name or "<image bytes>") if isinstance(source, (bytes, bytearray, memoryview)) \
            else os.fspath(source)
        if color:
            rgb = np.asarray(convert_image(image, "RGB", where))
            return np.ascontiguousarray(rgb[:, :, ::-1])
        return np.array(convert_image(image, "L", where))  # a writable copy


def is_palette_image(path):
    with open_image(path, load=False) as image:
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
