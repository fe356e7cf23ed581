"""Base class and registry of Caffe layer types.

One small class per Caffe type, registered with ``@register_layer("Type")``. The builder
(`segaware_caffe.net`) checks bottom/top counts from the class attributes, calls
``from_proto(layer_param, ctx)`` once (the only place that reads the ``*_param`` message), then
only calls ``forward(*bottoms)``, which returns one tensor or a tuple in top order.
"""
import contextlib
import difflib
import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .errors import LayerSetupError, NetBuildError

_REGISTRY = {}


def register_layer(*type_names):
    """Class decorator: register a CaffeLayer subclass under one or more Caffe type strings."""
    def wrap(cls):
        for type_name in type_names:
            if type_name in _REGISTRY:
                raise ValueError(f"layer type {type_name!r} is already registered "
                                 f"by {_REGISTRY[type_name].__qualname__}")
            _REGISTRY[type_name] = cls
        if not getattr(cls, "TYPE", None):
            cls.TYPE = type_names[0]
        return cls
    return wrap


def registered_types():
    return sorted(_REGISTRY)


def layer_class(type_name, layer_name="?"):
    try:
        return _REGISTRY[type_name]
    except KeyError:
        close = difflib.get_close_matches(type_name, _REGISTRY, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise NetBuildError(
            f"{layer_name} ({type_name}): unknown layer type {type_name!r}{hint}. "
            f"Supported types: {', '.join(registered_types())}. "
            f"Register your own with @segaware_caffe.register_layer({type_name!r}).") from None


@dataclass
class BuildContext:
    """What a layer may know while it is set up: its name, phase and the shapes it receives."""
    name: str
    type: str
    phase: str                      # "TRAIN" or "TEST" (the layer's own phase if set, else the net's)
    bottom_shapes: list = field(default_factory=list)   # list of tuple[int, ...]
    bottom_names: list = field(default_factory=list)
    top_names: list = field(default_factory=list)
    base_dir: str = "."            # directory of the prototxt, for relative paths in data layers
    overwrite: bool = False         # whether writer layers may overwrite existing files

    def error(self, message):
        return LayerSetupError(self.name, self.type, message)

    def warn(self, message):
        warnings.warn(f"{self.name} ({self.type}): {message}", stacklevel=3)


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """FakeTensorMode logs a traceback at ERROR level for every operator whose shape check fails
    before it re-raises; the builder reports that failure itself, naming the layer."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=None)
def _fake_mode():
    """One FakeTensorMode for all shape inference: making a new one per layer costs ~10 ms,
    reusing it ~1 ms (it memoises the fake copies of parameters weakly)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


class CaffeLayer(nn.Module):
    """A Caffe layer as a torch module. Subclasses set the class attributes and implement
    ``from_proto`` and ``forward``."""
    TYPE: ClassVar[str] = ""
    BOTTOMS: ClassVar[tuple] = (1, 1)      # (min, max); max None = any number
    TOPS: ClassVar[tuple] = (1, 1)
    IS_LOSS: ClassVar[bool] = False        # Caffe LossLayer: loss_weight 1 on top 0 by default
    # Caffe AutoTopBlobs: tops the prototxt leaves out (down to TOPS[0]) are created anonymous.
    # Loss layers always do this (a SoftmaxWithLoss with no top still adds to the loss).
    AUTO_TOPS: ClassVar[bool] = False
    CAFFE_BLOBS: ClassVar[tuple] = ()      # attribute names of the learnable blobs, Caffe order
    # True for layers with effects beyond their tops (file writers, accumulators)
    HAS_SIDE_EFFECTS: ClassVar[bool] = False
    # False where the original has no backward at all (its Backward is empty, or aborts): asking
    # a gradient through the layer is an error, unless propagate_down: false cuts it off
    HAS_BACKWARD: ClassVar[bool] = True
    # bottoms (indices; negative counts from the end) the original refuses to backpropagate into,
    # such as labels, indices and selectors: a gradient asked there is an error
    NO_GRAD_BOTTOMS: ClassVar[tuple] = ()

    @classmethod
    def refuses_gradient(cls, bottom_index, num_bottoms):
        """Whether the original aborts when a gradient reaches bottom `bottom_index`."""
        if not cls.HAS_BACKWARD:
            return True
        return any(i % num_bottoms == bottom_index for i in cls.NO_GRAD_BOTTOMS) if num_bottoms else False

    @classmethod
    def from_proto(cls, layer_param, ctx):
        raise NotImplementedError(f"{cls.__name__}.from_proto")

    def caffe_blobs(self):
        """The learnable blobs in Caffe order (what a .caffemodel stores for this layer)."""
        return [p for p in (getattr(self, n, None) for n in self.CAFFE_BLOBS) if p is not None]

    def set_caffe_blob(self, index, param):
        """Replace blob `index` (used for sharing parameters between layers)."""
        names = [n for n in self.CAFFE_BLOBS if getattr(self, n, None) is not None]
        setattr(self, names[index], param)

    def output_shapes(self, bottom_shapes):
        """Top shapes for the given bottom shapes. Default: run forward on fake tensors (no data,
        no compute). Layers whose forward depends on data values override this."""
        with _fake_mode(), torch.no_grad(), _quiet_fake_tensor_log():
            bottoms = [torch.empty(s) for s in bottom_shapes]
            tops = self.forward(*bottoms)
        if isinstance(tops, torch.Tensor):
            tops = (tops,)
        return [tuple(t.shape) for t in tops]
