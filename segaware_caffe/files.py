"""Writing files a user owns, one rule for every writer: an existing file (or a non-empty
folder) is replaced only when the caller asked for it, and new files get the permissions the
user's umask gives (like any program's `open`), never the 0600 of a private temporary file."""
import os
import secrets

from .errors import OutputExistsError, SegawareError

API_HINT = "pass overwrite=True to replace it"
CLI_HINT = "pass --force to replace it"


def refuse_existing(path, overwrite, hint=API_HINT):
    """Raise OutputExistsError when `path` exists (a file, a folder, a dangling link) and
    `overwrite` is false."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(f"{path}: file exists; {hint}")
    return path


def open_new(path, mode="wb", *, overwrite=False, hint=API_HINT):
    """open(path, mode) that refuses an existing file unless `overwrite` (the check and the
    creation are one system call, so no other writer can slip in between)."""
    path = os.fspath(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"open_new writes files: mode must be 'wb' or 'w', got {mode!r}")
    try:
        return open(path, mode if overwrite else mode.replace("w", "x"))
    except FileExistsError:
        raise OutputExistsError(f"{path}: file exists; {hint}") from None


def write_new(path, data, *, overwrite=False, hint=API_HINT):
    """Write bytes (or str) to a new file; see open_new."""
    with open_new(path, "w" if isinstance(data, str) else "wb", overwrite=overwrite,
                  hint=hint) as f:
        f.write(data)
    return os.fspath(path)


def _temporary_beside(path):
    """(descriptor, name) of a fresh file in the folder of `path`. Created with mode 0666 so the
    umask decides the final permissions (tempfile.mkstemp would make it 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        name = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o666), name
        except FileExistsError:
            continue
    raise OSError(f"{path}: cannot create a temporary file in {directory}")


def atomic_write(path, data, *, overwrite=False, hint=API_HINT):
    """Write `data` to `path` through a temporary file in the same folder, so a crash or a kill
    mid-write leaves any previous file of that name whole. Returns True when an existing file was
    replaced (only allowed with `overwrite`)."""
    path = os.fspath(path)
    refuse_existing(path, overwrite, hint)
    handle, temp = _temporary_beside(path)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        existed = os.path.lexists(path)
        if not overwrite:
            # link() fails if the name appeared meanwhile: no existing file is ever replaced
            try:
                os.link(temp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path}: file exists; {hint}") from None
            except OSError:  # file systems without hard links
                refuse_existing(path, overwrite, hint)
                os.replace(temp, path)
            else:
                os.unlink(temp)
        else:
            os.replace(temp, path)
        return existed
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def prepare_output_folder(path, *, overwrite=False, hint=API_HINT):
    """Create folder `path` (and its parents), or accept it when it exists and is empty; an
    existing non-empty folder is refused unless `overwrite`, a file of that name always."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"{path}: exists and is not a folder")
    if os.path.isdir(path):
        if not overwrite and any(True for _ in os.scandir(path)):
            raise OutputExistsError(f"{path}: folder exists and is not empty; {hint}")
        return path
    os.makedirs(path)
    return path


OUTPUT_DIR_ENV = "SEGAWARE_OUTPUT_DIR"


def output_folder():
    """The folder that paths named inside a net (MatWrite's prefix) may write to:
    $SEGAWARE_OUTPUT_DIR when set, else the working directory (where Caffe resolves them)."""
    return os.path.abspath(os.environ.get(OUTPUT_DIR_ENV) or os.getcwd())


class OutsideFolderError(SegawareError, ValueError):
    """A path read from an input file that would write outside the folder it must stay in."""


def check_inside(path, folder, what):
    """Raise OutsideFolderError unless `path` (relative paths: from the working directory) lies in
    `folder` once symbolic links of existing parts are resolved, and has no `..` component."""
    text = os.fspath(path)
    parts = text.replace("\\", "/").split("/")
    if ".." in parts:
        raise OutsideFolderError(f"{what} {text!r} contains '..'; paths written by a net must "
                                 f"stay in {os.path.abspath(folder)}")
    real = os.path.realpath(text)
    root = os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise OutsideFolderError(f"{what} {text!r} is outside the output folder {root}")
    return real
