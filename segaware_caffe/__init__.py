"""Caffe nets (segaware fork and BVLC) as PyTorch modules, with the original's numbers.

The distribution installs four more folders of the repository as subpackages of this one
(`segaware_caffe.caffe_proto`, `.kernels`, `.converters`, `.tools`), so that no generic top-level
name (`kernels`, `tools`) lands in site-packages. The public API below is imported on first use:
`import segaware_caffe` alone loads neither torch nor the layer registry, which keeps the command
line's start-up short.
"""
import importlib as _importlib
import os as _os

# In a source checkout those four folders sit beside this package rather than inside it; let the
# import system find them there (an installed copy has them inside and skips this).
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CHECKOUT = _os.path.dirname(_HERE)
if (not _os.path.isdir(_os.path.join(_HERE, "kernels"))
        and _os.path.isfile(_os.path.join(_CHECKOUT, "kernels", "__init__.py"))
        and _os.path.isfile(_os.path.join(_CHECKOUT, "setup.py"))):
    __path__.append(_CHECKOUT)

# public name -> submodule that defines it
_API = {
    "BuildContext": "layer",
    "CaffeLayer": "layer",
    "register_layer": "layer",
    "registered_types": "layer",
    "supported_layer_types": "layer",
    "LayerSetupError": "errors",
    "NetBuildError": "errors",
    "Net": "net",
    "WeightsReport": "weights",
    "Solver": "solver",
    "keep_freed_memory": "allocator",
}
__all__ = sorted(_API)


def __getattr__(name):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'segaware_caffe' has no attribute {name!r}")
    _importlib.import_module(f"{__name__}.layers")   # registers every layer type
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
