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

from . import budget
from .errors import LayerSetupError, NetBuildError, UnsupportedError

_REGISTRY = {}


def add_to_registry(table, names, value, what):
    """table[name] = value for each name, refusing a name already registered (`what` names the
    kind of entry in the message)."""
    for name in names:
        if name in table:
            raise ValueError(f"{what} {name!r} is already registered by "
                             f"{getattr(table[name], '__qualname__', table[name])}")
        table[name] = value


def register_layer(*type_names, params=None):
    """Class decorator: register a CaffeLayer subclass under one or more Caffe type strings.

    params: LayerParameter fields the schema does not have (another fork's `*_param`), in proto2
    syntax, e.g. 'optional UpsampleParameter upsample_param = 320; message UpsampleParameter
    { optional int32 scale = 1 [default = 2]; }'. Prototxts (and binary files) then carry them,
    and from_proto reads them as plain Python values with cls.user_params(layer_param).
    """
    if not type_names:
        raise TypeError("register_layer needs at least one Caffe type name")
    declared = ()
    if params is not None:
        from segaware_caffe.caffe_proto import extensions
        declared = tuple(extensions.declare(params, owner=f"layer type {type_names[0]!r}"))

    def wrap(cls):
        add_to_registry(_REGISTRY, type_names, cls, "layer type")
        if not getattr(cls, "TYPE", None):
            cls.TYPE = type_names[0]
        if declared:
            cls.USER_PARAMS = declared
        return cls
    return wrap


def _load_builtin_layers():
    """Import segaware_caffe.layers (which registers every built-in type) before the registry is
    read, so code that imports segaware_caffe.net or .layer directly sees the whole registry."""
    import importlib
    importlib.import_module("segaware_caffe.layers")


def registered_types():
    _load_builtin_layers()
    return sorted(_REGISTRY)


def supported_layer_types():
    """Every Caffe layer type a net may use: the built-in ones and those registered since."""
    import importlib
    importlib.import_module("segaware_caffe.layers")
    from . import net  # noqa: F401  (Input is defined beside the builder)
    return registered_types()


def layer_class(type_name, layer_name="?"):
    _load_builtin_layers()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        close = difflib.get_close_matches(type_name, _REGISTRY, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        shown = layer_name if layer_name.isprintable() else repr(layer_name)
        raise NetBuildError(
            f"{shown} ({type_name if type_name.isprintable() else repr(type_name)}): unknown "
            f"layer type {type_name!r}{hint}. "
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
    # the net's weights file sets this layer's blobs right after set-up: fillers need not run
    # (fillers.fill_parameter still checks them)
    weights_follow: bool = False

    def error(self, message):
        return LayerSetupError(self.name, self.type, message)

    def unsupported(self, message):
        """For a valid Caffe variant this project does not run, raised while the net is built."""
        return UnsupportedError(f"{self.name} ({self.type}): {message}")

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
    # a gradient through the layer (of a bottom or of a learnable blob) is an error, unless
    # propagate_down: false or lr_mult: 0 cuts it off. The builder enforces it on the layer's
    # tops; forward may compute them under torch.no_grad
    HAS_BACKWARD: ClassVar[bool] = True
    # bottoms (indices; negative counts from the end) the original refuses to backpropagate into,
    # such as labels, indices and selectors: a gradient asked there is an error
    NO_GRAD_BOTTOMS: ClassVar[tuple] = ()
    # LayerParameter fields declared with register_layer(..., params=...)
    USER_PARAMS: ClassVar[tuple] = ()
    # the one top has bottom 0's shape (elementwise layers): the builder needs no shape inference
    SAME_SHAPE: ClassVar[bool] = False

    @classmethod
    def user_params(cls, layer_param, *, given=False):
        """{field: plain Python value} of the fields declared with register_layer(params=...),
        with Caffe's defaults where the layer leaves them out (a message: a dict of its fields).
        given=True returns (values, set of the dotted names the layer sets explicitly)."""
        from segaware_caffe.caffe_proto import extensions
        values = extensions.values(layer_param, cls.USER_PARAMS)
        if given:
            return values, extensions.given(layer_param, cls.USER_PARAMS)
        return values

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

    def has_backward(self):
        """Whether the original has a Backward for this layer as configured: HAS_BACKWARD, which
        a layer whose Backward exists only in some configurations refines."""
        return self.HAS_BACKWARD

    def refuses_gradient(self, bottom_index, num_bottoms):
        """Whether the original aborts when a gradient reaches bottom `bottom_index`: every bottom
        of a layer without a backward, and the NO_GRAD_BOTTOMS of the others. The builder reads
        this once per bottom while it decides where gradients flow; a layer's forward does
        nothing about it."""
        if not self.has_backward():
            return True
        # a negative index counts from the end; an index past this layer's bottoms (an optional
        # bottom left out) refuses nothing
        return any((i + num_bottoms if i < 0 else i) == bottom_index for i in self.NO_GRAD_BOTTOMS)

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

    def new_parameter(self, shape, what, value=0.0):
        """An nn.Parameter of `shape` filled with `value` (float32), its shape checked (no
        negative dimension) and its size charged to the memory budget of the net being built
        before anything is allocated; `what` names the blob in errors ("weight", "bias"). While
        the net builder sets the layer up, the values are written after parameter sharing."""
        from .fillers import constant_parameter
        return constant_parameter(budget.reserve(shape, what, owner=self), value)

    def new_tensor(self, shape, what, value=0.0, dtype=None):
        """A plain tensor (a buffer) checked and charged like new_parameter."""
        return budget.full(shape, value, what, owner=self, dtype=dtype)

    def forward_workspace(self, bottom_shapes, top_shapes, itemsize):
        """Bytes of temporaries forward needs beyond its tops (a padded copy of a bottom, index
        tensors), for the given shapes and element size. The builder checks them against what
        the memory budget has left after the net's blobs. Default: none worth counting."""
        return 0

    def caffe_blobs(self):
        """The learnable blobs in Caffe order (what a .caffemodel stores for this layer)."""
        return [p for p in (getattr(self, n, None) for n in self.CAFFE_BLOBS) if p is not None]

    def set_caffe_blob(self, index, param):
        """Replace blob `index` (used for sharing parameters between layers)."""
        names = [n for n in self.CAFFE_BLOBS if getattr(self, n, None) is not None]
        setattr(self, names[index], param)

    def output_shapes(self, bottom_shapes):
        """Top shapes for the given bottom shapes: bottom 0's for SAME_SHAPE layers, else forward
        run on fake tensors (no data, no compute). Layers whose forward depends on data values
        override this, and so do the common layers whose rule is short (building a large net
        then costs no fake-tensor passes)."""
        if self.SAME_SHAPE:
            return [tuple(bottom_shapes[0])]
        return self.inferred_shapes(bottom_shapes)

    def inferred_shapes(self, bottom_shapes):
        """Top shapes from a forward on fake tensors (what output_shapes does by default)."""
        with _fake_mode(), torch.no_grad(), _quiet_fake_tensor_log():
            bottoms = [torch.empty(s) for s in bottom_shapes]
            tops = self.forward(*bottoms)
        if isinstance(tops, torch.Tensor):
            tops = (tops,)
        return [tuple(t.shape) for t in tops]

