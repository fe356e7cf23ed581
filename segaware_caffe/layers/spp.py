"""SPP: spatial pyramid pooling, one Pooling per pyramid level, flattened and concatenated."""
import math

import torch

from ..layer import CaffeLayer, register_layer
from ..params import four_axis_bottom
from .pooling import pool2d, pooled_size, stochastic_pool_train

_METHODS = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}   # SPPParameter.PoolMethod


def level_geometry(level, height, width):
    """(kernel, pad, stride) of pyramid level `level` (2^level bins a side) on an HxW input:
    kernel ceil(size / bins), stride = kernel, pad (kernel * bins - size + 1) // 2."""
    bins = 2 ** level
    kernel = tuple(math.ceil(size / bins) for size in (height, width))
    pad = tuple((k * bins - size + 1) // 2 for k, size in zip(kernel, (height, width)))
    return kernel, pad, kernel


def level_output(level, height, width):
    """Output size of a level: Pooling's ceil rule with its padding correction (it may differ
    from 2^level)."""
    kernel, pad, stride = level_geometry(level, height, width)
    padded = any(pad)
    return tuple(pooled_size(size, k, p, s, padded=padded)
                 for size, k, p, s in zip((height, width), kernel, pad, stride))


def check_levels(pyramid_height, method, height, width):
    """None if every level is a valid Pooling on HxW, else what the original's Pooling rejects."""
    for level in range(pyramid_height):
        kernel, pad, _ = level_geometry(level, height, width)
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            return (f"level {level} ({2 ** level} bins) on a {height}x{width} input needs pad {pad} "
                    f"with kernel {kernel}; Pooling requires pad < kernel (the input is too small "
                    f"for pyramid_height {pyramid_height})")
        if method == "STOCHASTIC" and any(pad):
            return (f"level {level} ({2 ** level} bins) on a {height}x{width} input needs pad {pad}, "
                    f"and STOCHASTIC pooling takes no padding")
    return None


def pyramid(x, pyramid_height, height, width, pool):
    """The pyramid's levels, pool(x, kernel, pad, stride, output size) each, flattened per item
    and concatenated (a single level is returned unflattened, as the original does)."""
    levels = [pool(x, *level_geometry(level, height, width), level_output(level, height, width))
              for level in range(pyramid_height)]
    if pyramid_height == 1:
        return levels[0]
    return torch.cat([t.flatten(1) for t in levels], dim=1)


@register_layer("SPP")
class SPP(CaffeLayer):
    """Level l = 0 .. pyramid_height-1 pools the (N, C, H, W) bottom with kernel ceil(H / 2^l)
    (per axis), stride = kernel and pad (kernel 2^l - H + 1) // 2, under Pooling's rules (ceil
    output size, AVE divisor counting padding). Each level is flattened to (N, C*Ho*Wo) and the
    levels are concatenated; with pyramid_height 1 the top is the single level unflattened,
    (N, C, 1, 1). The geometry follows the input size at every forward.

    STOCHASTIC levels always sample (the original's inner Pooling layers get a default, TRAIN,
    phase) and need inputs for which no level pads."""

    def __init__(self, *, pyramid_height, method="MAX"):
        super().__init__()
        if pyramid_height < 1:
            raise ValueError(f"pyramid_height must be >= 1, got {pyramid_height}")
        if method not in ("MAX", "AVE", "STOCHASTIC"):
            raise ValueError(f"method must be 'MAX', 'AVE' or 'STOCHASTIC', got {method!r}")
        self.pyramid_height, self.method = pyramid_height, method

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.spp_param
        shape = four_axis_bottom(ctx)
        if min(shape[2:]) <= 0:
            raise ctx.error(f"the bottom's height and width must be > 0, got shape {shape}")
        if not p.HasField("pyramid_height") or p.pyramid_height < 1:
            raise ctx.error(f"spp_param.pyramid_height must be given and >= 1, got "
                            f"{p.pyramid_height if p.HasField('pyramid_height') else 'none'}")
        method = _METHODS.get(p.pool)
        if method is None:
            raise ctx.error(f"spp_param.pool must be MAX, AVE or STOCHASTIC, got {p.pool}")
        problem = check_levels(p.pyramid_height, method, *shape[2:])
        if problem:
            raise ctx.error(problem)
        return cls(pyramid_height=int(p.pyramid_height), method=method)

    def forward(self, x):
        height, width = x.shape[-2:]
        problem = check_levels(self.pyramid_height, self.method, height, width)
        if problem:
            raise ValueError(f"SPP: {problem}")

        def pool(x, kernel, pad, stride, out):
            if self.method == "STOCHASTIC":
                return stochastic_pool_train(x, kernel, stride, out)
            return pool2d(x, self.method, kernel, pad, stride, out)
        return pyramid(x, self.pyramid_height, height, width, pool)

    def extra_repr(self):
        return f"pyramid_height={self.pyramid_height}, method={self.method}"
