"""DummyData: tops of fixed shapes filled by fillers, incl. the fork's "xy" filler."""
from dataclasses import dataclass

import torch

from ..fillers import fill
from ..layer import CaffeLayer, register_layer


@dataclass(frozen=True)
class FillerSpec:
    """The fields of a FillerParameter as plain values (what `fillers.fill` reads)."""
    type: str = "constant"
    value: float = 0.0
    min: float = 0.0
    max: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    sparse: int = -1
    variance_norm: int = 0

    @classmethod
    def from_proto(cls, filler):
        return cls(type=filler.type, value=filler.value, min=filler.min, max=filler.max,
                   mean=filler.mean, std=filler.std, sparse=filler.sparse,
                   variance_norm=filler.variance_norm)


@register_layer("DummyData")
class DummyData(CaffeLayer):
    """One top per shape, filled by its filler. A constant filler fills once; any other filler
    (random, "xy") fills anew at every forward. forward() returns fresh tensors."""
    BOTTOMS = (0, 0)
    TOPS = (1, None)

    def __init__(self, *, shapes, fillers):
        super().__init__()
        if len(shapes) != len(fillers):
            raise ValueError(f"one filler per shape expected, got {len(shapes)} shapes and "
                             f"{len(fillers)} fillers")
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.fillers = list(fillers)
        for index, (shape, filler) in enumerate(zip(self.shapes, self.fillers)):
            # Filled here: the constant tops' values (charged to the memory budget); the others
            # are drawn at every forward and the buffer only carries dtype and device.
            initial = (self.new_tensor(shape, f"constant top {index}", float(filler.value))
                       if filler.type == "constant" else torch.empty(0))
            self.register_buffer(f"top{index}", initial, persistent=False)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        dp = layer_param.dummy_data_param
        num_tops = len(ctx.top_names)
        if len(dp.data_filler) not in (0, 1, num_tops):
            raise ctx.error(f"dummy_data_param needs 0, 1 or {num_tops} (one per top) data_filler "
                            f"entries, got {len(dp.data_filler)}")
        legacy = {name: list(getattr(dp, name)) for name in ("num", "channels", "height", "width")}
        if len(dp.shape) and any(legacy.values()):
            raise ctx.error("dummy_data_param: give either shape or num/channels/height/width, "
                            "not both")
        if len(dp.shape):
            if len(dp.shape) not in (1, num_tops):
                raise ctx.error(f"dummy_data_param needs 1 or {num_tops} (one per top) shape "
                                f"entries, got {len(dp.shape)}")
            shapes = [tuple(dp.shape[i if len(dp.shape) > 1 else 0].dim) for i in range(num_tops)]
        else:
            for name, values in legacy.items():
                if len(values) not in (1, num_tops):
                    raise ctx.error(f"dummy_data_param.{name} needs 1 or {num_tops} (one per top) "
                                    f"values, got {len(values)}")
            shapes = [tuple(values[i if len(values) > 1 else 0] for values in legacy.values())
                      for i in range(num_tops)]
        for top, shape in zip(ctx.top_names, shapes):
            if any(d < 0 for d in shape):
                raise ctx.error(f"top {top!r}: negative dimension in shape {shape}")
        if dp.data_filler:
            specs = [FillerSpec.from_proto(dp.data_filler[i if len(dp.data_filler) > 1 else 0])
                     for i in range(num_tops)]
        else:
            specs = [FillerSpec()] * num_tops
        for spec, shape in zip(specs, shapes):
            fill(spec, shape, ctx)  # a bad filler (type, xy shape) fails now, not in forward
        return cls(shapes=shapes, fillers=specs)

    def constant_top(self, top_index):
        # Caffe fills a constant top once, at set-up, and its Forward never writes it again
        return self.fillers[top_index].type == "constant"

    def output_shapes(self, bottom_shapes):
        return list(self.shapes)

    def forward(self):
        tops = []
        for index, (shape, filler) in enumerate(zip(self.shapes, self.fillers)):
            stored = getattr(self, f"top{index}")
            if filler.type == "constant":
                tops.append(stored.clone())
            else:
                tops.append(fill(filler, shape).to(device=stored.device, dtype=stored.dtype))
        return tops[0] if len(tops) == 1 else tuple(tops)

    def extra_repr(self):
        return ", ".join(f"{shape}: {filler.type}" for shape, filler in zip(self.shapes, self.fillers))
