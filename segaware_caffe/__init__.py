"""Caffe nets (segaware fork and BVLC) as PyTorch modules, with the original's numbers."""
from .errors import LayerSetupError, NetBuildError
from .layer import BuildContext, CaffeLayer, register_layer, registered_types
from . import layers  # noqa: F401  (registers every layer type)

__all__ = ["BuildContext", "CaffeLayer", "LayerSetupError", "NetBuildError", "register_layer",
           "registered_types"]
from .net import Net, WeightsReport
from .solver import Solver

__all__ += ["Net", "Solver", "WeightsReport"]
