"""Caffe nets (segaware fork and BVLC) as PyTorch modules, with the original's numbers."""
from . import layers  # noqa: F401  (registers every layer type)
from .errors import LayerSetupError, NetBuildError
from .layer import BuildContext, CaffeLayer, register_layer, registered_types
from .net import Net, WeightsReport
from .solver import Solver

__all__ = ["BuildContext", "CaffeLayer", "LayerSetupError", "Net", "NetBuildError", "Solver",
           "WeightsReport", "register_layer", "registered_types"]
