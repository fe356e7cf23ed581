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

from ..errors import SegawareError


class DataError(SegawareError, OSError):
    """A data file (image, array, list item) cannot be read or batched. The message names the
    file, and for a data layer the layer and the list line."""


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
