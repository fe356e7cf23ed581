"""Code emitters for `segaware-caffe export --python`, one small function per Caffe layer type.

Importing this package registers every emitter (each module registers on import)."""
from . import activation, conv, normalization, pooling, segaware, shape, tensor_ops  # noqa: F401
from .registry import (Emission, LayerSpec, emitter_for, helper_names, helper_source, literal,
                       register_emitter, register_helper, registered_emitters)

__all__ = ["Emission", "LayerSpec", "emitter_for", "helper_names", "helper_source", "literal",
           "register_emitter", "register_helper", "registered_emitters"]
