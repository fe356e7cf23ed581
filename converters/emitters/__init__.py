"""Code emitters for `segaware-caffe export --python`, one small function per Caffe layer type.

Importing this package registers every emitter (each module registers on import)."""
from . import activation, conv, pooling, segaware, tensor_ops  # noqa: F401  (registration)
from .registry import Emission, LayerSpec, emitter_for, literal, register_emitter, registered_emitters

__all__ = ["Emission", "LayerSpec", "emitter_for", "literal", "register_emitter", "registered_emitters"]
