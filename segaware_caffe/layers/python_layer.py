"""Python: a layer written in Python against pycaffe's `caffe.Layer`, run unchanged.

The module named by python_param.module is imported from sys.path, then the prototxt's
directory, then the working directory, with segaware_caffe.pycaffe_shim standing in for `caffe`
(see there). Blobs are NumPy float32 arrays on the CPU; the layer runs as an autograd function
whose backward calls the user's backward(top, propagate_down, bottom).
"""
import importlib
import os
import sys
import traceback

import numpy as np
import torch
from torch import nn

from .. import pycaffe_shim
from ..errors import NoBackwardError, PythonLayerError
from ..layer import CaffeLayer, register_layer

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_place(error):
    """'file:line in function' of the innermost frame outside segaware-caffe (the user's)."""
    frames = traceback.extract_tb(error.__traceback__)
    user = [f for f in frames if not os.path.abspath(f.filename).startswith(_PACKAGE_DIR + os.sep)]
    frame = (user or frames)[-1] if frames else None
    return f"{frame.filename}:{frame.lineno} (in {frame.name})" if frame else "?"


def import_user_module(module_name, extra_dirs):
    """Import `module_name` with the shim as `caffe`, looking in sys.path, then extra_dirs."""
    added = [d for d in extra_dirs if d not in sys.path]
    sys.path.extend(added)
    try:
        with pycaffe_shim.installed():
            return importlib.import_module(module_name)
    finally:
        for d in added:
            if d in sys.path:
                sys.path.remove(d)


class _PythonLayerFunction(torch.autograd.Function):
    """Forward: the user's reshape + forward on copies of the bottoms. Backward: the user's
    backward on the saved bottoms and tops with the top diffs; returns the bottom diffs (and the
    diffs of the layer's own blobs)."""

    @staticmethod
    def forward(ctx, layer, num_bottoms, *inputs):
        bottoms = [_to_numpy(x) for x in inputs[:num_bottoms]]
        tops = layer.run_forward(bottoms)
        ctx.layer, ctx.num_bottoms = layer, num_bottoms
        ctx.bottoms, ctx.tops = bottoms, [t.copy() for t in tops]
        like = inputs[0] if inputs else None
        out = tuple(_to_tensor(t, like) for t in tops)
        return out

    @staticmethod
    def backward(ctx, *grads):
        layer = ctx.layer
        needs = list(ctx.needs_input_grad[2:2 + ctx.num_bottoms])
        top_diffs = [np.zeros(t.shape, np.float32) if g is None else _to_numpy(g)
                     for t, g in zip(ctx.tops, grads)]
        bottom_diffs, blob_diffs = layer.run_backward(ctx.bottoms, ctx.tops, top_diffs, needs)
        like = grads[0] if grads else None
        out = [None, None]
        out += [_to_tensor(d, like) if need else None for d, need in zip(bottom_diffs, needs)]
        params = ctx.needs_input_grad[2 + ctx.num_bottoms:]
        out += [_to_tensor(d, like) if need else None for d, need in zip(blob_diffs, params)]
        return tuple(out)


def _to_numpy(x):
    return np.array(x.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, copy=True)


def _to_tensor(array, like):
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())
    if like is not None:
        tensor = tensor.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
    return tensor


@register_layer("Python")
class Python(CaffeLayer):
    """The user's caffe.Layer subclass python_param.layer from module python_param.module, with
    self.param_str / self.param_str_ = python_param.param_str and self.phase = caffe.TRAIN or
    caffe.TEST. Learnable blobs it adds in setup (self.blobs.add_blob) are the layer's Caffe
    blobs, in order. share_in_parallel is accepted and has no effect (one process)."""
    BOTTOMS = (0, None)
    TOPS = (0, None)
    HAS_SIDE_EFFECTS = True

    def __init__(self, *, user_layer, layer_name, bottom_shapes, num_tops):
        super().__init__()
        self.user_layer, self.layer_name = user_layer, layer_name
        self.num_tops = num_tops
        self.user_class = type(user_layer).__name__
        self.user_module = type(user_layer).__module__
        bottoms = [pycaffe_shim.Blob(shape) for shape in bottom_shapes]
        tops = [pycaffe_shim.Blob() for _ in range(num_tops)]
        self._call("setup", bottoms, tops, setup=True)
        self._call("reshape", bottoms, tops, setup=True)
        self.setup_top_shapes = [t.shape for t in tops]
        blobs = list(user_layer.blobs)
        names = []
        for index, blob in enumerate(blobs):
            name = f"blob{index}"
            setattr(self, name, nn.Parameter(torch.from_numpy(blob.data.copy())))
            names.append(name)
        self.CAFFE_BLOBS = tuple(names)     # the user's blobs, in the order added

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.python_param
        if not p.module:
            raise ctx.error("python_param.module is required (the Python module with the layer)")
        if not p.layer:
            raise ctx.error("python_param.layer is required (the class name in the module)")
        dirs = [os.path.abspath(ctx.base_dir), os.getcwd()]
        try:
            module = import_user_module(p.module, dirs)
        except ModuleNotFoundError as e:
            if e.name and p.module.split(".")[0] != e.name.split(".")[0] and e.name != p.module:
                raise ctx.error(f"module {p.module!r} could not import {e.name!r} "
                                f"(at {_user_place(e)}): {e}") from e
            raise ctx.error(f"python_param.module {p.module!r} not found on sys.path, in the "
                            f"prototxt's directory {dirs[0]} or in the working directory "
                            f"{dirs[1]}") from None
        except Exception as e:
            raise ctx.error(f"importing module {p.module!r} failed at {_user_place(e)}: "
                            f"{type(e).__name__}: {e}") from e
        where = getattr(module, "__file__", p.module)
        user_class = getattr(module, p.layer, None)
        if user_class is None:
            names = sorted(n for n, v in vars(module).items()
                           if isinstance(v, type) and issubclass(v, pycaffe_shim.Layer)
                           and v is not pycaffe_shim.Layer)
            raise ctx.error(f"module {p.module!r} ({where}) has no class {p.layer!r}"
                            + (f"; its caffe.Layer classes: {', '.join(names)}" if names else ""))
        if not (isinstance(user_class, type) and issubclass(user_class, pycaffe_shim.Layer)):
            raise ctx.error(f"{p.module}.{p.layer} ({where}) is not a subclass of caffe.Layer as "
                            f"segaware-caffe provides it (was the module imported earlier with "
                            f"another `caffe`, such as pycaffe?)")
        # Caffe creates the layer with its LayerParameter, the net's phase filled in
        param = type(layer_param)()
        param.CopyFrom(layer_param)
        param.phase = pycaffe_shim.TRAIN if ctx.phase == "TRAIN" else pycaffe_shim.TEST
        try:
            with pycaffe_shim.installed():
                user_layer = user_class(param)
        except Exception as e:
            raise ctx.error(f"creating {p.module}.{p.layer} failed at {_user_place(e)}: "
                            f"{type(e).__name__}: {e}") from e
        try:
            return cls(user_layer=user_layer, layer_name=ctx.name,
                       bottom_shapes=[tuple(s) for s in ctx.bottom_shapes],
                       num_tops=len(ctx.top_names))
        except PythonLayerError as e:
            raise ctx.error(str(e).split(": ", 1)[1]) from e.__cause__

    def _call(self, method, *args, setup=False):
        function = getattr(self.user_layer, method, None)
        if function is None:
            raise PythonLayerError(f"{self.layer_name} (Python): {self.user_module}."
                                   f"{self.user_class} has no {method}()")
        try:
            with pycaffe_shim.installed():
                return function(*args)
        except Exception as e:
            raise PythonLayerError(f"{self.layer_name} (Python): {self.user_module}."
                                   f"{self.user_class}.{method} raised {type(e).__name__}: {e} "
                                   f"at {_user_place(e)}") from e

    def output_shapes(self, bottom_shapes):
        return [tuple(s) for s in self.setup_top_shapes]

    def _sync_blobs(self):
        for name, blob in zip(self.CAFFE_BLOBS, self.user_layer.blobs):
            blob.data[...] = getattr(self, name).detach().to("cpu", torch.float32).numpy()

    def run_forward(self, bottom_arrays):
        self._sync_blobs()
        bottoms = [pycaffe_shim.Blob(a.shape, a) for a in bottom_arrays]
        tops = [pycaffe_shim.Blob(shape) for shape in self.setup_top_shapes]
        self._call("reshape", bottoms, tops)
        self._call("forward", bottoms, tops)
        return [t.data.copy() for t in tops]

    def run_backward(self, bottom_arrays, top_arrays, top_diffs, propagate_down):
        if getattr(self.user_layer, "backward", None) is None:
            raise NoBackwardError(f"{self.layer_name} (Python): {self.user_module}."
                                  f"{self.user_class} has no backward(), but a gradient was "
                                  f"asked through it; set propagate_down: false for its bottoms")
        self._sync_blobs()
        bottoms = [pycaffe_shim.Blob(a.shape, a) for a in bottom_arrays]
        tops = [pycaffe_shim.Blob(a.shape, a) for a in top_arrays]
        for top, diff in zip(tops, top_diffs):
            top.diff[...] = diff
        for blob in self.user_layer.blobs:
            blob.diff[...] = 0
        self._call("backward", tops, list(propagate_down), bottoms)
        return ([b.diff.copy() for b in bottoms],
                [blob.diff.copy() for blob in self.user_layer.blobs])

    def forward(self, *bottoms):
        params = [getattr(self, name) for name in self.CAFFE_BLOBS]
        tops = _PythonLayerFunction.apply(self, len(bottoms), *bottoms, *params)
        if self.num_tops == 1:
            return tops[0]
        return tuple(tops)

    def extra_repr(self):
        return f"{self.user_module}.{self.user_class}"
