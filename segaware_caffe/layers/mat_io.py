"""MatWrite / MatRead (DeepLab v2, matio): blobs to and from MATLAB .mat files.

File names are ``prefix + name + "_blob_" + i + ".mat"`` for bottom/top i, where name is the
k-th entry of `source` (first token of each non-blank line, minus its last `strip` characters)
or ``"iter_<k>"`` when no source is given. The variable ``data`` is float32 with MATLAB dims
(W, H, C, N): ``data(w+1, h+1, c+1, n+1) = blob[n, c, h, w]`` (Caffe's row-major memory read
column-major), written as uncompressed MAT5 like matio's default.
"""
import os

import numpy as np
import scipy.io
import torch

from ..data.images import DataError
from ..errors import OutputExistsError, SegawareError
from ..files import OUTPUT_DIR_ENV, OutsideFolderError, check_inside, open_new, output_folder
from ..data.listfile import read_lines, resolve_file
from .. import limits
from ..layer import CaffeLayer, register_layer


def _read_names(param, ctx, what):
    """The names of `source` with `strip` characters removed, or None without a source."""
    if param.strip < 0:
        raise ctx.error(f"{what}.strip must be >= 0, got {param.strip}")
    if not param.source:
        return None
    path = resolve_file(param.source, ctx, f"{what}.source")
    names = []
    for line in read_lines(path):
        token = line.tokens[0]
        if len(token) <= param.strip:
            raise ctx.error(f"{what}.strip {param.strip} removes all of {token!r} (list {path}, "
                            f"line {line.number})")
        names.append(token[:len(token) - param.strip] if param.strip else token)
    if not names:
        raise ctx.error(f"{what}.source {path} has no names")
    return names


def blob_to_matlab(array):
    """NCHW (up to 4 axes; missing trailing axes count as 1, like Caffe's legacy shape) ->
    the (W, H, C, N) array MATLAB sees."""
    shape = tuple(array.shape) + (1,) * (4 - array.ndim)
    return np.ascontiguousarray(array.reshape(shape).transpose(3, 2, 1, 0), dtype=np.float32)


def matlab_to_blob(array):
    """A MATLAB (W, H, C, N) array (fewer dims = trailing 1s) -> NCHW float32."""
    shape = tuple(array.shape) + (1,) * (4 - array.ndim)
    return np.ascontiguousarray(array.reshape(shape).transpose(3, 2, 1, 0), dtype=np.float32)


def _check_destination(prefix, names, ctx):
    """Refuse a prefix (or a name of `source`) that climbs with `..` or points outside the output
    folder: a prototxt from elsewhere must not write files wherever it likes."""
    folder = output_folder()
    where = f"the output folder {folder} (the working directory, or ${OUTPUT_DIR_ENV})"
    checks = [(f"mat_write_param.prefix {prefix!r}", prefix)]
    checks += [(f"mat_write_param.source name {name!r}", prefix + name) for name in names or ()]
    for what, path in checks:
        if ".." in path.replace("\\", "/").split("/"):
            raise ctx.error(f"{what} contains '..'; .mat files are written only inside {where}")
        try:
            check_inside(path, folder, what)
        except OutsideFolderError:
            raise ctx.error(f"{what} puts files at {path + '*.mat'!r}, outside {where}; set "
                            f"${OUTPUT_DIR_ENV} to the folder the .mat files belong in") from None


@register_layer("MatWrite")
class MatWrite(CaffeLayer):
    """Writes every bottom to a .mat file each `period`-th forward (counting from the first).
    An existing file is an error unless the net was built with overwrite=True (Caffe silently
    kept the old file); without `source` files are named iter_<k> (Caffe crashed). The files must
    land inside the output folder (the working directory, or $SEGAWARE_OUTPUT_DIR): a prefix or a
    source name with `..`, or one pointing elsewhere, is refused when the net is built."""
    BOTTOMS = (1, None)
    TOPS = (0, 0)
    HAS_SIDE_EFFECTS = True

    def __init__(self, *, prefix, names, period, overwrite=False, label="MatWrite"):
        super().__init__()
        self.prefix, self.names, self.period = prefix, names, period
        self.overwrite, self.label = overwrite, label
        self.iteration = 0

    @classmethod
    def from_proto(cls, layer_param, ctx):
        param = layer_param.mat_write_param
        if not param.prefix:
            raise ctx.error("mat_write_param.prefix is required (directory and file-name start "
                            "of the .mat files)")
        if param.period <= 0:
            raise ctx.error(f"mat_write_param.period must be > 0, got {param.period}")
        for name, shape in zip(ctx.bottom_names, ctx.bottom_shapes):
            if len(shape) > 4:
                raise ctx.error(f"bottom {name!r} has {len(shape)} axes {tuple(shape)}; .mat "
                                f"output supports at most 4 (N, C, H, W)")
        names = _read_names(param, ctx, "mat_write_param")
        _check_destination(param.prefix, names, ctx)
        first = os.path.dirname(param.prefix + (names[0] if names else "iter_0"))
        if first and not os.path.isdir(first):
            # Caffe fails only when it writes; building (to inspect, to train) must not need it
            ctx.warn(f"output directory {first!r} does not exist (yet); forward will fail "
                     f"unless it is created first")
        return cls(prefix=param.prefix, names=names, period=int(param.period),
                   overwrite=ctx.overwrite, label=f"{ctx.name} ({ctx.type})")

    def output_shapes(self, bottom_shapes):
        return []  # no tops; must not run forward (it writes files)

    def file_name(self, iteration, index):
        name = self.names[iteration] if self.names is not None else f"iter_{iteration}"
        return f"{self.prefix}{name}_blob_{index}.mat"

    def forward(self, *bottoms):
        iteration = self.iteration
        self.iteration += 1
        if iteration % self.period:
            return ()
        if self.names is not None and iteration >= len(self.names):
            raise DataError(f"{self.label}: forward {iteration + 1} needs name {iteration + 1} of "
                            f"mat_write_param.source, which has only {len(self.names)}")
        paths = [self.file_name(iteration, i) for i in range(len(bottoms))]
        for path in paths:
            folder = os.path.dirname(path)
            if folder and not os.path.isdir(folder):
                raise DataError(f"{self.label}: cannot write {path}: directory {folder!r} does "
                                f"not exist")
            if not self.overwrite and os.path.lexists(path):
                raise OutputExistsError(f"{self.label}: {path} already exists; remove it or build "
                                        f"the net with overwrite=True")
        for path, blob in zip(paths, bottoms):
            array = blob.detach().to("cpu", torch.float32).numpy()
            with open_new(path, overwrite=self.overwrite) as f:
                scipy.io.savemat(f, {"data": blob_to_matlab(array)}, format="5",
                                 do_compression=False, oned_as="column")
        return ()

    def extra_repr(self):
        source = f"{len(self.names)} names" if self.names is not None else "iter_<k>"
        return f"prefix={self.prefix!r}, names={source}, period={self.period}"


class MatFileError(SegawareError, ValueError):
    """A .mat file that does not hold what MatRead expects (the message names the file)."""


def read_mat_blob(path):
    """The NCHW float32 blob stored as variable `data` of a .mat file (Caffe's ReadBlobFromMat:
    single precision, at most 4 dims)."""
    try:
        content = scipy.io.loadmat(path, squeeze_me=False)
    except (OSError, ValueError, NotImplementedError) as e:
        raise MatFileError(f"cannot read {path}: {e}") from None
    if "data" not in content:
        names = ", ".join(k for k in content if not k.startswith("__")) or "none"
        raise MatFileError(f"{path} has no variable 'data' (variables: {names})")
    data = content["data"]
    if data.dtype != np.float32:
        raise MatFileError(f"{path}: variable 'data' is {data.dtype}, expected single precision "
                           f"(float32)")
    if data.ndim > 4:
        raise MatFileError(f"{path}: variable 'data' has {data.ndim} dims, at most 4 allowed")
    return matlab_to_blob(data)


@register_layer("MatRead")
class MatRead(CaffeLayer):
    """Each forward reads batch_size consecutive names of `source` (wrapping around), one file
    per top, each holding one item (N = 1). Top shapes are fixed by the first name's files."""
    BOTTOMS = (0, 0)
    TOPS = (1, None)

    def __init__(self, *, prefix, names, batch_size, item_shapes, label="MatRead"):
        super().__init__()
        self.prefix, self.names, self.batch_size = prefix, names, batch_size
        self.item_shapes = [tuple(s) for s in item_shapes]
        self.label = label
        self.iteration = 0
        self.register_buffer("_placement", torch.empty(0), persistent=False)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        param = layer_param.mat_read_param
        if not param.prefix:
            raise ctx.error("mat_read_param.prefix is required")
        if param.batch_size <= 0:
            raise ctx.error(f"mat_read_param.batch_size must be > 0, got {param.batch_size}")
        limits.check(param.batch_size, "batch_size", "mat_read_param.batch_size",
                     f"{ctx.name} ({ctx.type})")
        names = _read_names(param, ctx, "mat_read_param")
        label = f"{ctx.name} ({ctx.type})"
        layer = cls(prefix=param.prefix, names=names, batch_size=int(param.batch_size),
                    item_shapes=[], label=label)
        shapes = []
        for i in range(len(ctx.top_names)):
            path = layer.file_name(0, i)
            if not os.path.isfile(path):
                raise ctx.error(f"{path} does not exist (mat_read_param.prefix {param.prefix!r})")
            try:
                blob = read_mat_blob(path)
            except MatFileError as e:
                raise ctx.error(str(e)) from None
            if blob.shape[0] != 1:
                raise ctx.error(f"{path} holds {blob.shape[0]} items (N); MatRead files hold one")
            shapes.append(blob.shape[1:])
        layer.item_shapes = shapes
        return layer

    def file_name(self, iteration, index):
        if self.names is not None:
            name = self.names[iteration % len(self.names)]
        else:
            name = f"iter_{iteration}"
        return f"{self.prefix}{name}_blob_{index}.mat"

    def output_shapes(self, bottom_shapes):
        return [(self.batch_size,) + s for s in self.item_shapes]

    def forward(self):
        tops = [[] for _ in self.item_shapes]
        for _ in range(self.batch_size):
            for i, shape in enumerate(self.item_shapes):
                path = self.file_name(self.iteration, i)
                try:
                    blob = read_mat_blob(path)
                except MatFileError as e:
                    raise DataError(f"{self.label}: {e}") from None
                if blob.shape != (1,) + shape:
                    raise DataError(f"{self.label}: {path} holds a blob of shape {blob.shape}, "
                                    f"expected {(1,) + shape} like the first file")
                tops[i].append(blob[0])
            self.iteration += 1
        placement = self._placement
        out = tuple(torch.from_numpy(np.stack(t)).to(device=placement.device, dtype=placement.dtype)
                    for t in tops)
        return out if len(out) > 1 else out[0]

    def extra_repr(self):
        return f"prefix={self.prefix!r}, batch_size={self.batch_size}"
