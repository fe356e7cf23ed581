""".npy arrays given on the command line (`run --input`, `test --input`): the header is read and
checked against the file size before anything is allocated, so a file that claims a huge shape
(or was cut short) is a DataError naming it, never a MemoryError or numpy's reshape message; arrays
of Python objects (which numpy would unpickle) are refused."""
import os

import numpy as np
from numpy.lib import format as npy_format

from .images import DataError


def _header(f, where):
    try:
        version = npy_format.read_magic(f)
    except ValueError as e:
        raise DataError(f"{where}: not a .npy file ({e})") from None
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    reader = readers.get(version)
    if reader is None:
        if version == (3, 0) and hasattr(npy_format, "_read_array_header"):
            def reader(stream):
                return npy_format._read_array_header(stream, version)
        else:
            raise DataError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported")
    try:
        return reader(f)
    except MemoryError:
        raise
    except Exception as e:  # numpy parses the header as a Python literal: any error type
        raise DataError(f"{where}: broken .npy header ({type(e).__name__}: {e})") from None


def read_npy(path):
    """The array stored in a .npy file, after checking that its header (shape, dtype) fits the
    bytes that follow it."""
    where = os.fspath(path)
    try:
        f = open(where, "rb")
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except OSError as e:
        raise DataError(f"{where}: cannot open: {e.strerror or e}") from None
    with f:
        shape, fortran_order, dtype = _header(f, where)
        if dtype.hasobject or dtype.kind not in "biuf":
            raise DataError(f"{where}: holds {dtype} values; expected a numeric array (bool, "
                            f"integer or floating point; arrays of Python objects are refused)")
        if any(int(d) < 0 for d in shape):
            raise DataError(f"{where}: negative dimension in the declared shape {shape}")
        count = 1
        for d in shape:
            count *= int(d)
        expected = count * dtype.itemsize
        available = os.fstat(f.fileno()).st_size - f.tell()
        if available < expected:
            raise DataError(f"{where}: the header declares a {dtype} array of shape {tuple(shape)} "
                            f"({expected:,} bytes) but only {available:,} bytes follow: the file "
                            f"is truncated or its header is wrong")
        data = np.frombuffer(f.read(expected), dtype=dtype, count=count)
    order = "F" if fortran_order else "C"
    return data.reshape(shape, order=order).copy(order="C")
