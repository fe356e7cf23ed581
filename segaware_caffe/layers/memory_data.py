"""MemoryData: batches cut from arrays the caller hands in (pycaffe's net.set_input_arrays)."""
import warnings

import numpy as np
import torch

from ..data.images import DataError
from ..errors import NetBuildError
from ..layer import CaffeLayer, register_layer


def _as_float_tensor(array, what, label):
    """A float32 tensor sharing the memory of a C-contiguous float32 array (so that, as in Caffe,
    the tops alias the caller's arrays); other inputs are converted (a copy)."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
    else:
        try:
            array = np.asarray(array)
        except Exception as e:
            raise TypeError(f"{label}: {what} must be an array, got {type(array).__name__}: {e}") from None
        if array.dtype.kind not in "fiub":
            raise TypeError(f"{label}: {what} must hold numbers, got dtype {array.dtype}")
        if array.dtype != np.float32 or not array.flags.c_contiguous or not array.flags.writeable:
            array = np.ascontiguousarray(array, dtype=np.float32)
        tensor = torch.from_numpy(array)
    if tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    return tensor.contiguous()


@register_layer("MemoryData")
class MemoryData(CaffeLayer):
    """memory_data_param { batch_size channels height width }: tops data (batch, C, H, W) and
    label (batch, 1, 1, 1). Hand the items in with `layer.set_input_arrays(data, labels)` or
    `net.set_input_arrays(data, labels)`: data (N, C, H, W), labels (N,) or (N, 1, 1, 1), N a
    multiple of batch_size. Each forward returns the next batch_size items, wrapping around to
    the first after the last. The arrays are not copied when they are C-contiguous float32 NumPy
    arrays (or tensors): the tops are views of them, so changing them changes later batches, as
    in Caffe. transform_param does not apply to arrays handed in this way (as in Caffe, where it
    only applies to AddDatumVector/AddMatVector)."""
    BOTTOMS = (0, 0)
    TOPS = (2, 2)

    def __init__(self, *, batch_size, channels, height, width, has_transform_param=False,
                 label="MemoryData"):
        super().__init__()
        self.batch_size, self.channels = int(batch_size), int(channels)
        self.height, self.width = int(height), int(width)
        self.has_transform_param, self.label = bool(has_transform_param), label
        self._data = self._labels = None
        self._position = 0
        self.register_buffer("_placement", torch.empty(0), persistent=False)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        param = layer_param.memory_data_param
        values = {f: int(getattr(param, f)) for f in ("batch_size", "channels", "height", "width")}
        bad = [f"{f} {v}" for f, v in values.items() if v <= 0]
        if bad:
            raise ctx.error(f"memory_data_param batch_size, channels, height and width must all be "
                            f"given and > 0 (got {', '.join(bad)})")
        return cls(**values, has_transform_param=layer_param.HasField("transform_param"),
                   label=f"{ctx.name} ({ctx.type})")

    def set_input_arrays(self, data, labels):
        """Hand in N items: data (N, channels, height, width), labels (N,) or (N, 1, 1, 1); N must
        be a positive multiple of batch_size. The next forward starts at item 0."""
        data = _as_float_tensor(data, "data", self.label)
        labels = _as_float_tensor(labels, "labels", self.label)
        want = (self.channels, self.height, self.width)
        if data.dim() != 4 or tuple(data.shape[1:]) != want:
            raise ValueError(f"{self.label}: data must be (N, {', '.join(map(str, want))}) as "
                             f"memory_data_param says, got {tuple(data.shape)}")
        if labels.dim() == 1:
            labels = labels.view(-1, 1, 1, 1)
        if labels.dim() != 4 or tuple(labels.shape[1:]) != (1, 1, 1):
            raise ValueError(f"{self.label}: labels must be (N,) or (N, 1, 1, 1), got "
                             f"{tuple(labels.shape)}")
        if data.shape[0] != labels.shape[0]:
            raise ValueError(f"{self.label}: data has {data.shape[0]} items but labels has "
                             f"{labels.shape[0]}")
        if data.shape[0] == 0 or data.shape[0] % self.batch_size:
            raise ValueError(f"{self.label}: the number of items ({data.shape[0]}) must be a "
                             f"positive multiple of batch_size {self.batch_size}")
        if self.has_transform_param:
            warnings.warn(f"{self.label}: transform_param does not apply to arrays handed in with "
                          f"set_input_arrays (as in Caffe); they are used unchanged", stacklevel=2)
        self._data, self._labels, self._position = data, labels, 0

    def output_shapes(self, bottom_shapes):
        return [(self.batch_size, self.channels, self.height, self.width),
                (self.batch_size, 1, 1, 1)]

    def forward(self):
        if self._data is None:
            raise DataError(f"{self.label}: no arrays were handed in; call "
                               f"net.set_input_arrays(data, labels) (or this layer's "
                               f"set_input_arrays) before forward")
        start, stop = self._position, self._position + self.batch_size
        self._position = stop % self._data.shape[0]
        placement = self._placement
        return tuple(t[start:stop].to(device=placement.device, dtype=placement.dtype)
                     for t in (self._data, self._labels))

    def extra_repr(self):
        return (f"batch_size={self.batch_size}, shape=({self.channels}, {self.height}, "
                f"{self.width})" + (f", items={self._data.shape[0]}" if self._data is not None else ""))


def set_input_arrays(net, data, labels, layer=None):
    """pycaffe's Net.set_input_arrays: hand (data, labels) to the net's MemoryData layer, or to
    the one named `layer` when there are several."""
    records = [r for r in net.records if r.type == "MemoryData"]
    if layer is not None:
        named = [r for r in records if r.name == layer]
        if not named:
            raise NetBuildError(f"net {net.name or ''}: no MemoryData layer named {layer!r} "
                                f"(MemoryData layers: {', '.join(r.name for r in records) or 'none'})")
        records = named
    if not records:
        raise NetBuildError(f"net {net.name or ''}: set_input_arrays needs a MemoryData layer; "
                            f"the net has none")
    if len(records) > 1:
        raise NetBuildError(f"net {net.name or ''}: {len(records)} MemoryData layers "
                            f"({', '.join(r.name for r in records)}); name one with layer=...")
    records[0].module.set_input_arrays(data, labels)
