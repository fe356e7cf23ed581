"""HDF5Output: writes its two bottoms as the datasets "data" and "label" of an HDF5 file."""
import os

import torch

from ..data.hdf5 import write_datasets
from ..data.images import DataError
from ..data.optional import require_at_build
from ..layer import CaffeLayer, register_layer
from ..errors import OutputExistsError


def legacy_4d(shape):
    """Caffe's num/channels/height/width view of a blob shape (missing axes are 1)."""
    return tuple(shape) + (1,) * (4 - len(shape))


@register_layer("HDF5Output")
class HDF5Output(CaffeLayer):
    """hdf5_output_param { file_name }: each forward writes bottom 0 as dataset "data" and
    bottom 1 as "label", both as 4-D (num, channels, height, width) blobs, float32 (float64 in a
    float64 net). The file holds the latest forward's batch and is complete after every forward.
    (Caffe created the file when the net was set up and aborted on a second forward, whose
    datasets already existed; here every forward rewrites it.) An existing file is an error when
    the net is built, unless the net was built with overwrite=True."""
    BOTTOMS = (2, 2)
    TOPS = (0, 0)
    HAS_SIDE_EFFECTS = True
    HAS_BACKWARD = False      # the original's Backward is empty

    def __init__(self, *, file_name, overwrite=False, label="HDF5Output"):
        super().__init__()
        self.file_name, self.overwrite, self.label = file_name, bool(overwrite), label
        if os.path.lexists(file_name) and not overwrite:
            raise OutputExistsError(f"{label}: {file_name} already exists; remove it or build the "
                                    f"net with overwrite=True")

    @classmethod
    def from_proto(cls, layer_param, ctx):
        require_at_build("h5py", ctx)
        file_name = layer_param.hdf5_output_param.file_name
        if not file_name:
            raise ctx.error("hdf5_output_param.file_name is required")
        for name, shape in zip(ctx.bottom_names, ctx.bottom_shapes):
            if len(shape) > 4:
                raise ctx.error(f"bottom {name!r} has {len(shape)} axes {tuple(shape)}; HDF5Output "
                                f"writes 4-D (num, channels, height, width) blobs")
        shapes = [legacy_4d(s) for s in ctx.bottom_shapes]
        if shapes and shapes[0][0] != shapes[1][0]:
            raise ctx.error(f"data and label bottoms must have the same number of items, got "
                            f"{shapes[0][0]} and {shapes[1][0]}")
        if os.path.exists(file_name) and not ctx.overwrite:
            raise ctx.error(f"{file_name} already exists; remove it or build the net with "
                            f"overwrite=True")
        folder = os.path.dirname(file_name)
        if folder and not os.path.isdir(folder):
            ctx.warn(f"output directory {folder!r} does not exist (yet); forward will fail "
                     f"unless it is created first")
        # Caffe creates the file when the net is set up: the working directory of that moment
        return cls(file_name=os.path.abspath(file_name), overwrite=ctx.overwrite,
                   label=f"{ctx.name} ({ctx.type})")

    def output_shapes(self, bottom_shapes):
        return []  # no tops; must not run forward (it writes a file)

    def forward(self, data, label):
        items = [legacy_4d(tuple(blob.shape))[0] for blob in (data, label)]
        if items[0] != items[1]:
            raise DataError(f"{self.label}: data and label must have the same number of items, "
                            f"got {items[0]} and {items[1]}")
        arrays = {}
        for name, blob in (("data", data), ("label", label)):
            dtype = torch.float64 if blob.dtype == torch.float64 else torch.float32
            array = blob.detach().to("cpu", dtype).numpy()
            arrays[name] = array.reshape(legacy_4d(array.shape))
        write_datasets(self.file_name, arrays, self.label)
        return ()

    def extra_repr(self):
        return f"file_name={self.file_name!r}"
