"""The optional packages of the data layers (h5py for HDF5Data/HDF5Output, lmdb and plyvel for
Data), imported only when such a layer is built, with one clear error when one is missing."""
import importlib

EXTRA = "pip install segaware-caffe[data]"

# import name -> what needs it
PACKAGES = {
    "h5py": "HDF5 files (HDF5Data, HDF5Output)",
    "lmdb": "LMDB databases (Data with backend: LMDB)",
    "plyvel": "LevelDB databases (Data with backend: LEVELDB)",
}


class MissingDependency(ImportError):
    """An optional package a data layer needs is not installed."""


def require(module_name, who=""):
    """The imported module, or MissingDependency naming the package and how to install it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        prefix = f"{who}: " if who else ""
        raise MissingDependency(
            f"{prefix}reading {PACKAGES.get(module_name, module_name)} needs the Python package "
            f"{module_name!r}, which is not installed ({e}); install the data extras with "
            f"`{EXTRA}` (or `pip install {module_name}`)") from None


def require_at_build(module_name, ctx):
    """`require` for from_proto: a missing package is a build error naming the layer."""
    try:
        return require(module_name)
    except MissingDependency as e:
        raise ctx.error(str(e)) from None
