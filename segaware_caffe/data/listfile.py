"""List files of the image data layers: locating them and splitting their lines.

Paths inside a list are ``root_folder + token`` (plain string concatenation, as in Caffe; the
released VOC lists start with "/" and the configs give a root without a trailing slash).
"""
import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ListLine:
    number: int          # 1-based line number in the list file
    tokens: tuple        # whitespace-separated tokens


def _candidates(path, ctx, what, kind):
    """Where Caffe (the working directory) and then the prototxt's directory put `path`."""
    if not path:
        raise ctx.error(f"{what} is empty; expected the path of a {kind}")
    return [path] if os.path.isabs(path) else [path, os.path.join(ctx.base_dir, path)]


def _not_found(path, ctx, what):
    if os.path.isabs(path):
        return ctx.error(f"{what} {path!r} does not exist")
    return ctx.error(f"{what} {path!r} not found in the working directory ({os.getcwd()}) "
                     f"nor beside the prototxt ({os.path.abspath(ctx.base_dir)})")


def resolve_file(path, ctx, what):
    """`path` as given if it exists (Caffe opens it relative to the working directory), else
    relative to the prototxt's directory. Raises a layer error naming both places."""
    candidates = _candidates(path, ctx, what, "file")
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise _not_found(path, ctx, what)


def resolve_dir(path, ctx, what):
    """Like `resolve_file`, for a directory (an LMDB or LevelDB database)."""
    candidates = _candidates(path, ctx, what, "directory")
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    for candidate in candidates:
        if os.path.exists(candidate):
            raise ctx.error(f"{what} {candidate!r} is a file; expected a database directory")
    raise _not_found(path, ctx, what)


def resolve_item(path, base_dir):
    """A file named inside a list: as given when it exists (Caffe opens it relative to the working
    directory), else beside the prototxt when it exists there, else as given (so that the error
    that follows names the path the list holds)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    beside = os.path.join(base_dir, path)
    return beside if os.path.exists(beside) else path


def read_tokens(path):
    """Every whitespace-separated token of a text file with its 1-based line number (Caffe's
    `file >> name` loops read tokens, not lines)."""
    with open(path) as f:
        return [(number, token) for number, text in enumerate(f, start=1) for token in text.split()]


def read_lines(path):
    """The non-blank lines of a text file, with their line numbers."""
    with open(path) as f:
        return [ListLine(number, tuple(text.split()))
                for number, text in enumerate(f, start=1) if text.strip()]


_LEADING_INT = re.compile(r"\s*([+-]?\d+)")


def c_atoi(text):
    """C's atoi: the leading integer of `text`, 0 when there is none ("12abc" -> 12, "a" -> 0)."""
    match = _LEADING_INT.match(text)
    return int(match.group(1)) if match else 0


def saturate_uint8(value):
    """OpenCV's saturate_cast<uchar> of an integer."""
    return min(max(int(value), 0), 255)
