"""HDF5 files of the HDF5Data and HDF5Output layers (through h5py, imported on first use)."""
import numpy as np

from .images import DataError
from .optional import require


def _h5py(label):
    return require("h5py", label)


def dataset_shapes(path, names, label):
    """{name: shape} of the named datasets of an HDF5 file, checked as Caffe's loader checks them
    (present, at least one axis, numeric, the same number of rows). Raises DataError."""
    h5py = _h5py(label)
    try:
        with h5py.File(path, "r") as f:
            return _check(f, path, names, label)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{label}: cannot read HDF5 file {path}: {e}") from None


def _check(f, path, names, label):
    import h5py
    shapes = {}
    for name in names:
        node = f.get(name)
        if not isinstance(node, h5py.Dataset):
            present = ", ".join(sorted(k for k in f if isinstance(f[k], h5py.Dataset))) or "none"
            raise DataError(f"{label}: {path} has no dataset {name!r} (each top reads the dataset "
                            f"of its name; datasets in the file: {present})")
        if node.ndim < 1:
            raise DataError(f"{label}: {path}: dataset {name!r} is a scalar; expected at least one "
                            f"axis (axis 0 = items)")
        if node.dtype.kind not in "fiu":
            raise DataError(f"{label}: {path}: dataset {name!r} holds {node.dtype}; expected "
                            f"floating-point or integer numbers")
        shapes[name] = tuple(int(d) for d in node.shape)
    rows = {shape[0] for shape in shapes.values()}
    if len(rows) > 1:
        listing = ", ".join(f"{n} {s[0]}" for n, s in shapes.items())
        raise DataError(f"{label}: {path}: the datasets have different numbers of rows ({listing}); "
                        f"they must all have the same")
    return shapes


def read_datasets(path, names, label):
    """The named datasets of an HDF5 file as float32 arrays (integers are converted, as Caffe's
    H5LTread_dataset_float does). Raises DataError naming the file and dataset."""
    h5py = _h5py(label)
    try:
        with h5py.File(path, "r") as f:
            _check(f, path, names, label)
            return {name: np.asarray(f[name][()], dtype=np.float32) for name in names}
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{label}: cannot read HDF5 file {path}: {e}") from None


def write_datasets(path, arrays, label):
    """(Re)create the HDF5 file `path` holding `arrays` ({dataset name: numpy array})."""
    h5py = _h5py(label)
    try:
        with h5py.File(path, "w") as f:
            for name, array in arrays.items():
                f.create_dataset(name, data=array)
    except OSError as e:
        raise DataError(f"{label}: cannot write HDF5 file {path}: {e}") from None
