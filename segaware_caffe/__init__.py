"""Caffe nets (segaware fork and BVLC) as PyTorch modules, with the original's numbers."""
from .errors import LayerSetupError, NetBuildError
from .layer import BuildContext, CaffeLayer, register_layer, registered_types
from . import layers  # noqa: F401  (registers every layer type)

__all__ = ["BuildContext", "CaffeLayer", "LayerSetupError", "NetBuildError", "register_layer",
           "registered_types"]

try:  # the net builder and the solver are optional while the package is assembled
    from .net import Net  # noqa: F401
    __all__.append("Net")
except ImportError:  # pragma: no cover
    pass
