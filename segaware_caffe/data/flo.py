"""Middlebury .flo optical-flow files (FlowNet's FloData layer)."""
import numpy as np

from ..files import open_new
from .images import DataError

FLO_MAGIC = np.float32(202021.25)
# a sanity bound on the header's sizes (a corrupt header must not ask for gigabytes)
_MAX_SIDE = 1 << 16


def read_flo(path, label=""):
    """(2, H, W) float32: channel 0 = u (horizontal), 1 = v. The file is the float32 202021.25,
    int32 width, int32 height, then width*height interleaved (u, v) float32 pairs, row by row
    (little-endian). Raises DataError naming the file when it is not such a file."""
    prefix = f"{label}: " if label else ""
    try:
        with open(path, "rb") as f:
            header = f.read(12)
            if len(header) < 12:
                raise DataError(f"{prefix}{path}: not a .flo file (only {len(header)} bytes, the "
                                f"header alone has 12)")
            magic = np.frombuffer(header, "<f4", count=1)[0]
            width, height = (int(v) for v in np.frombuffer(header, "<i4", count=2, offset=4))
            if magic != FLO_MAGIC:
                raise DataError(f"{prefix}{path}: not a .flo file (starts with {magic!r}, expected "
                                f"the tag 202021.25)")
            if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
                raise DataError(f"{prefix}{path}: corrupt .flo header: width {width}, height "
                                f"{height}")
            count = 2 * width * height
            values = np.frombuffer(f.read(4 * count), "<f4")
    except OSError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{prefix}cannot read {path}: {e}") from None
    if values.size < count:
        raise DataError(f"{prefix}{path}: truncated .flo file: {values.size} of {count} flow values "
                        f"for {width}x{height}")
    return np.ascontiguousarray(values.reshape(height, width, 2).transpose(2, 0, 1), np.float32)


def write_flo(path, flow, *, overwrite=False):
    """Write a (2, H, W) flow as a .flo file (an existing file only with `overwrite`)."""
    flow = np.asarray(flow, np.float32)
    _, height, width = flow.shape
    with open_new(path, overwrite=overwrite) as f:
        f.write(FLO_MAGIC.tobytes())
        f.write(np.array([width, height], "<i4").tobytes())
        f.write(np.ascontiguousarray(flow.transpose(1, 2, 0), "<f4").tobytes())
