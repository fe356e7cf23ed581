"""Keeping freed memory in the process (glibc), so that large tensors reuse pages.

torch's CPU tensors come from malloc. glibc serves blocks above 32 MB with fresh mmap pages
and gives freed memory at the top of its heap back to the system, so every forward of a net
with large blobs (the res deploy net at 513x513: 64 x 513 x 513 floats is 67 MB) faults in and
zeroes fresh pages for each of them, again on every call. Measured on this project's 2-core
machine, the res deploy forward took 5.25-5.41 s that way and 5.04-5.07 s with the memory kept
at one thread, 2.58-2.71 s and 2.43-2.50 s at two (peak RSS +4%); vgg deploy (no blob above
32 MB) is unchanged.

`keep_freed_memory()` switches glibc to serving every block from its heap and never trimming
it: the process then keeps its peak memory between forwards (as OpenCV's dnn keeps its blob
pool). It changes the whole process's allocator, so the library does not do it behind the
user's back: the `segaware-caffe` command calls it (unless SEGAWARE_KEEP_FREED_MEMORY=0), a
Python program calls it itself. Elsewhere than glibc it does nothing and returns False.
"""
import ctypes
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1

_state = {"kept": False}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)           # the C library this process already runs on
        libc.gnu_get_libc_version          # glibc only (musl has no such function)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory():
    """Serve large blocks from the heap and never trim it (glibc; see the module's text).
    Returns whether the allocator now keeps freed memory."""
    if _state["kept"]:
        return True
    libc = _glibc()
    if libc is None:
        return False
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_INT_MAX))
    mapped = libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0))
    _state["kept"] = bool(trimmed and mapped)
    return _state["kept"]
