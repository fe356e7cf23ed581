"""The part of pycaffe's `caffe` module that Python layers use, for running them without Caffe.

A `type: "Python"` layer names a module that does `import caffe` and subclasses `caffe.Layer`.
While such a module is imported, and while its layer's setup / reshape / forward / backward run,
this module stands in `sys.modules` as `caffe` (with `caffe.proto.caffe_pb2`); any module that
was there before (pycaffe itself, say) is put back afterwards. So the user's module always gets
this shim, even where a real pycaffe is installed: a real `caffe.Layer` could not be driven
without real Caffe blobs.

What it offers is what pycaffe offers a Python layer: `Layer` with `setup`, `reshape`,
`forward`, `backward(top, propagate_down, bottom)`, `param_str` (and the older `param_str_`),
`phase` (TRAIN or TEST) and `blobs` (learnable blobs: `self.blobs.add_blob(*shape)`); blobs
with `data` and `diff` NumPy arrays, `reshape(*shape)`, `count`, `shape`, `num`, `channels`,
`height`, `width`.
"""
import contextlib
import sys
import types

import numpy as np

TRAIN, TEST = 0, 1


class Blob:
    """A float32 blob: `data` and `diff` are NumPy arrays of its current shape (writing into
    them, e.g. `top[0].data[...] = x`, is how a layer gives its outputs)."""

    def __init__(self, shape=(), data=None):
        self._shape = ()
        self._data = np.zeros(0, np.float32)
        self._diff = np.zeros(0, np.float32)
        self.reshape(*shape)
        if data is not None:
            self._data[...] = data

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"blob dimensions must be >= 0, got {shape}")
        if shape != self._shape:
            self._shape = shape
            self._data = np.zeros(shape, np.float32)
            self._diff = np.zeros(shape, np.float32)

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):       # pycaffe has no setter; assigning whole arrays is common anyway
        self._data[...] = value

    @property
    def diff(self):
        return self._diff

    @diff.setter
    def diff(self, value):
        self._diff[...] = value

    @property
    def shape(self):
        return self._shape

    @property
    def count(self):
        return int(np.prod(self._shape, dtype=np.int64)) if self._shape else 1

    def _legacy(self, axis):
        # Caffe's LegacyShape: axes past the blob's count as 1
        return self._shape[axis] if axis < len(self._shape) else 1

    num, channels, height, width = (property(lambda self, axis=axis: self._legacy(axis))
                                    for axis in range(4))

    def __repr__(self):
        return f"caffe.Blob(shape={self._shape})"


class BlobVec(list):
    """A layer's learnable blobs (pycaffe's `self.blobs`)."""

    def add_blob(self, *shape):
        self.append(Blob(shape))


class Layer:
    """Base class of Python layers. Like pycaffe, segaware-caffe creates the layer with its
    LayerParameter (phase set), which gives `param_str`, `phase` and an empty `blobs`; then
    `setup(bottom, top)`, and `reshape` and `forward` for every pass, `backward` when gradients
    flow. There is no default `backward`: a layer without one cannot pass gradients."""

    def __init__(self, param=None):
        python_param = getattr(param, "python_param", None)
        self.param_str = self.param_str_ = python_param.param_str if python_param else ""
        self.phase = int(param.phase) if param is not None and param.HasField("phase") else TEST
        self.blobs = BlobVec()

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        pass


def _module():
    """This module, plus `caffe.proto.caffe_pb2`, as the modules to install."""
    from .caffe_proto import caffe_pb2
    shim = sys.modules[__name__]
    proto = types.ModuleType("caffe.proto")
    proto.caffe_pb2 = caffe_pb2
    shim.proto = proto
    return {"caffe": shim, "caffe.proto": proto, "caffe.proto.caffe_pb2": caffe_pb2}


@contextlib.contextmanager
def installed():
    """`caffe` (and caffe.proto) in sys.modules are this shim inside the block; whatever was
    there before is restored after it."""
    modules = _module()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
