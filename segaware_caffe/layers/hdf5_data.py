"""HDF5Data: rows of HDF5 files listed in a text file; each top reads the dataset of its name."""
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..data.hdf5 import dataset_shapes, read_datasets
from ..data.images import DataError, data_setup_error
from ..data.listfile import read_tokens, resolve_file, resolve_item
from ..data.optional import require_at_build
from ..data.stream import StreamDataLayer, draw_seed
from .. import limits
from ..layer import register_layer


def _permutation(count, shuffle, generator):
    if shuffle:
        return torch.randperm(count, generator=generator).numpy()
    return np.arange(count)


@dataclass(frozen=True)
class HDF5Rows:
    """Caffe's HDF5Data walk: the files in list order (a fresh random order per pass with
    shuffle), all rows of one file before the next (in a fresh random order each time the file
    is started, with shuffle), wrapping around after the last file; one file is in memory at a
    time. A batch continues across file boundaries."""
    files: tuple
    names: tuple
    shapes: tuple          # per-row shape of each top, fixed by the first file
    shuffle: bool
    label: str

    def load(self, path):
        arrays = read_datasets(path, self.names, self.label)
        for name, shape in zip(self.names, self.shapes):
            if arrays[name].shape[1:] != shape:
                raise DataError(f"{self.label}: {path}: dataset {name!r} has rows of shape "
                                f"{arrays[name].shape[1:]}, but the first file's rows are {shape}; "
                                f"every file must have the same row shapes")
        return [arrays[name] for name in self.names]

    def __call__(self, generator):
        order = _permutation(len(self.files), self.shuffle, generator)
        position = 0
        arrays = self.load(self.files[order[0]])
        rows = _permutation(len(arrays[0]), self.shuffle, generator)
        row, empty_loads = 0, 0
        while True:
            if row == len(rows):
                if len(self.files) > 1:
                    position += 1
                    if position == len(self.files):
                        position = 0
                        if self.shuffle:
                            order = _permutation(len(self.files), True, generator)
                    arrays = self.load(self.files[order[position]])
                empty_loads = empty_loads + 1 if not len(arrays[0]) else 0
                if empty_loads > len(self.files):
                    raise DataError(f"{self.label}: every HDF5 file of the list is empty "
                                    f"({', '.join(self.files)})")
                rows = _permutation(len(arrays[0]), self.shuffle, generator)
                row = 0
                continue
            index = rows[row]
            row += 1
            yield tuple(a[index] for a in arrays)


@register_layer("HDF5Data")
class HDF5Data(StreamDataLayer):
    """hdf5_data_param { source batch_size shuffle }: `source` lists .h5 files (whitespace
    separated; relative paths from the working directory, else beside the prototxt). Top i is the
    dataset named like it, axis 0 = items; tops are (batch_size,) + the dataset's row shape.
    Integer datasets are read as float. transform_param is refused, as in Caffe. The shuffle order
    is drawn from torch's generator (Caffe used std::random_shuffle)."""
    TOPS = (1, None)

    def __init__(self, *, files, tops, batch_size, shuffle, seed, row_shapes, label="HDF5Data",
                 num_workers=None):
        super().__init__()
        self.files, self.tops, self.shuffle = tuple(files), tuple(tops), bool(shuffle)
        rows = HDF5Rows(files=self.files, names=self.tops,
                        shapes=tuple(tuple(s) for s in row_shapes), shuffle=self.shuffle,
                        label=label)
        self._setup_stream(produce=rows, seed=seed, batch_size=batch_size,
                           top_shapes=[(batch_size,) + tuple(s) for s in row_shapes], label=label,
                           num_workers=num_workers)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        if layer_param.HasField("transform_param"):
            raise ctx.error("HDF5Data does not transform data (as in Caffe); remove transform_param")
        require_at_build("h5py", ctx)
        param = layer_param.hdf5_data_param
        if param.batch_size <= 0:
            raise ctx.error(f"hdf5_data_param.batch_size must be > 0, got {param.batch_size}")
        limits.check(param.batch_size, "batch_size", "hdf5_data_param.batch_size",
                     f"{ctx.name} ({ctx.type})")
        source = resolve_file(param.source, ctx, "hdf5_data_param.source")
        files = [os.path.abspath(resolve_item(token, ctx.base_dir))
                 for _, token in read_tokens(source)]
        if not files:
            raise ctx.error(f"hdf5_data_param.source {source} lists no HDF5 files")
        label = f"{ctx.name} ({ctx.type})"
        try:
            shapes = dataset_shapes(files[0], ctx.top_names, label)
        except DataError as e:
            raise data_setup_error(ctx, e) from None
        return cls(files=files, tops=ctx.top_names, batch_size=int(param.batch_size),
                   shuffle=bool(param.shuffle), seed=draw_seed(),
                   row_shapes=[shapes[name][1:] for name in ctx.top_names], label=label)

    def extra_repr(self):
        return (f"files={len(self.files)}, batch_size={self.batch_size}"
                + (", shuffle=True" if self.shuffle else ""))
