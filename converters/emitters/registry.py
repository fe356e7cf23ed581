"""Registry of code emitters: one small function per Caffe layer type (onnx2torch's pattern).

An emitter gets a `LayerSpec` (the built layer's plain constructor values and the Python names of
its bottoms) and returns an `Emission` -- the attribute to create in `__init__` (if any) and the
expression that computes the tops in `forward` -- or None when this instance uses a variant plain
torch cannot express; the exporter then instantiates the segaware_caffe layer module itself.
"""
import keyword
import math
from dataclasses import dataclass

import numpy as np

from segaware_caffe.layer import add_to_registry

_EMITTERS = {}


@dataclass
class LayerSpec:
    name: str                 # Caffe layer name
    type: str                 # Caffe layer type
    key: str                  # attribute name (Net.layers key, also the tensor name prefix)
    kwargs: dict              # the layer module's constructor keyword arguments
    module: object            # the built segaware_caffe layer module
    bottoms: list             # Python variable names of the bottoms
    bottom_shapes: list       # build-time shapes of the bottoms
    num_tops: int
    phase: str                # "TRAIN" or "TEST"

    @property
    def attr(self):
        """How generated code reads the layer's module attribute."""
        return attribute_expression(self.key)


def attribute_expression(key):
    """`self.<key>`, or `getattr(self, '<key>')` for a key that is no plain ASCII name (a Caffe
    layer named `class`)."""
    plain = key.isidentifier() and key.isascii() and not keyword.iskeyword(key)
    return f"self.{key}" if plain else f"getattr(self, {key!r})"


@dataclass
class Emission:
    expression: str           # computes the top (or a tuple of tops) from the bottom variables
    module: str = None        # constructor expression of `self.<key>`, None for inline code
    imports: tuple = ()       # import lines the code needs
    plain_torch: bool = True  # False when it calls a segmentation-aware kernel (no ONNX)
    note: str = ""            # a short comment for the forward line
    helpers: tuple = ()       # names of helper definitions (register_helper) the code uses


_HELPERS = {}


def register_helper(name, source):
    """A plain-torch definition (function or nn.Module class) that exported modules include when
    an emission lists `name` in its helpers; its name is reserved (no blob variable takes it)."""
    add_to_registry(_HELPERS, [name], source, "an export helper")
    return name


def helper_source(name):
    return _HELPERS[name]


def helper_names():
    return frozenset(_HELPERS)


def register_emitter(*type_names):
    """Decorator: register `fn(spec) -> Emission | None` for one or more Caffe types."""
    def wrap(fn):
        add_to_registry(_EMITTERS, type_names, fn, "an emitter for layer type")
        return fn
    return wrap


def emitter_for(type_name):
    """The registered emitter of a Caffe type, or None (the exporter falls back to the layer
    module)."""
    return _EMITTERS.get(type_name)


def registered_emitters():
    return sorted(_EMITTERS)


def literal(value):
    """Python source for a plain value; float32-exact floats are written in their shortest float32
    form (0.0039215, not 0.003921499941498041): in float32 arithmetic both are the same number."""
    if isinstance(value, (bool, type(None), str)):
        return repr(value)
    if isinstance(value, (int, np.integer)):
        return repr(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return f"float({str(value)!r})"
        if float(np.float32(value)) == value:
            text = str(np.float32(value))          # shortest text that reads back as this float32
            if float(np.float32(float(text))) == value:
                return text if any(c in text for c in ".en") else text + ".0"
        return repr(value)
    if isinstance(value, tuple):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no literal for {type(value).__name__}")


def pair_or_int(pair):
    """`3` for (3, 3), `(3, 1)` otherwise: how a person writes kernel sizes."""
    pair = tuple(int(v) for v in pair)
    return literal(pair[0]) if pair[0] == pair[1] else literal(pair)

