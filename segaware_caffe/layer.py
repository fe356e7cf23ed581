"""Base class and registry of Caffe layer types.

One small class per Caffe type, registered with ``@register_layer("Type")``. The builder
(`segaware_caffe.net`) checks bottom/top counts from the class attributes, calls
``from_proto(layer_param, ctx)`` once (the only place that reads the ``*_param`` message), then
only calls ``forward(*bottoms)``, which returns one tensor or a tuple in top order.
"""
import difflib
import functools
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .errors import LayerSetupError, NetBuildError

_REGISTRY = {}


def add_to_registry(table, names, value, what):
    """table[name] = value for each name, refusing a name already registered (`what` names the
    kind of entry in the message)."""
    for name in names:
        if name in table:
            raise ValueError(f"{what} {name!r} is already registered by "
                             f"{getattr(table[name], '__qualname__', table[name])}")
        table[name] = value


def register_layer(*type_names):
    """Class decorator: register a CaffeLayer subclass under one or more Caffe type strings."""
    def wrap(cls):
        add_to_registry(_REGISTRY, type_names, cls, "layer type")
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


@functools.lru_cache(maxsize=None)
def _fake_mode():
    """One FakeTensorMode for all shape inference: making a new one per layer costs ~10 ms,
    reusing it ~1 ms (it memoises the fake copies of parameters weakly)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


class CaffeLayer(nn.Module):
    """A Caffe layer as a torch module. Subclasses set the class attributes and implement
    ``from_proto`` and ``forward``.

    The class attributes are facts the builder reads; their defaults fit an ordinary layer, so a
    new layer type sets only those that differ. Every instance keeps the keyword arguments it was
    constructed with (``layer.config``): ``type(layer)(**layer.config)`` builds it again, which
    is what `export --python` writes for layers it has no plain-torch emitter for."""
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
    # bottoms that force_backward does not force a gradient into (Caffe's AllowForceBackward
    # false). None: bottom 1 of a loss layer (its label, as Caffe's LossLayer), no bottom otherwise
    NO_FORCE_BACKWARD: ClassVar[tuple] = None
    # bottoms whose diff the original's backward writes whatever propagate_down says (the builder
    # then lets that diff reach a producer that runs its own backward)
    IGNORES_PROPAGATE_DOWN: ClassVar[tuple] = ()
    # every top is bottom 0's memory from set-up on (Caffe's Reshape() calls ShareData, as in
    # Reshape): Net::Forward's element-0 zeroing of a net output then reaches the bottom's memory.
    # Split and Flatten share only in their Forward, after that zeroing, and do not declare it
    SHARES_BOTTOM_DATA: ClassVar[bool] = False
    # the tops are fed by the caller (Input): the builder makes them graph inputs
    NET_INPUT: ClassVar[bool] = False
    # computed by a segmentation-aware kernel of segaware_caffe.kernels (CuPy on CUDA), which
    # ONNX has no operator for
    USES_SEGAWARE_KERNELS: ClassVar[bool] = False

    def __new__(cls, *args, **kwargs):
        # the constructor's keyword arguments, as the caller gave them (before __init__ runs);
        # positional arguments are not a configuration export can write back
        self = super().__new__(cls)
        self.__dict__["_caffe_config"] = None if args else dict(kwargs)
        return self

    @property
    def config(self):
        """The keyword arguments this layer was constructed with (a copy), or None when it was
        given positional arguments."""
        config = self.__dict__.get("_caffe_config")
        return None if config is None else dict(config)

    @classmethod
    def refuses_gradient(cls, bottom_index, num_bottoms):
        """Whether the original aborts when a gradient reaches bottom `bottom_index`."""
        if not cls.HAS_BACKWARD:
            return True
        return any(i % num_bottoms == bottom_index for i in cls.NO_GRAD_BOTTOMS) if num_bottoms else False

    @classmethod
    def allow_force_backward(cls, bottom_index, num_bottoms):
        """Caffe's AllowForceBackward: whether force_backward makes this bottom need a diff."""
        refused = cls.NO_FORCE_BACKWARD if cls.NO_FORCE_BACKWARD is not None else \
            ((1,) if cls.IS_LOSS else ())
        return not any(i % num_bottoms == bottom_index for i in refused) if num_bottoms else True

    def top_shares_bottom(self, top_index, num_bottoms):
        """Whether top `top_index` is bottom 0's memory (SHARES_BOTTOM_DATA, refined by layers
        that share only in some configurations)."""
        return self.SHARES_BOTTOM_DATA

    def constant_top(self, top_index):
        """Whether forward leaves top `top_index`'s memory as set-up wrote it (a DummyData top with
        a constant filler): the net's element-0 zeroing of outputs then stays in it."""
        return False

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
        with _fake_mode(), torch.no_grad():
            bottoms = [torch.empty(s) for s in bottom_shapes]
            tops = self.forward(*bottoms)
        if isinstance(tops, torch.Tensor):
            tops = (tops,)
        return [tuple(t.shape) for t in tops]
