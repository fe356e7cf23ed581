"""Caffe's weight fillers (FillerParameter), with its fan-in/fan-out rules.

Random fillers draw from torch's generator (Caffe's boost stream cannot be reproduced); golden
tests load explicit weights.
"""
import math

import torch

from . import budget


def _fans(shape):
    count = math.prod(shape)
    fan_in = count // shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _norm_n(filler, shape):
    fan_in, fan_out = _fans(shape)
    mode = filler.variance_norm  # FAN_IN=0, FAN_OUT=1, AVERAGE=2
    if mode == 1:
        return fan_out
    if mode == 2:
        return (fan_in + fan_out) / 2.0
    return fan_in


def fill(filler, shape, ctx=None, default_type="constant", default_value=0.0, generator=None):
    """A float32 tensor of `shape` filled as `filler` (a FillerParameter, or None for the layer's
    default: constant `default_value`). The shape is checked (no negative dimension) and its size
    against the memory budget before anything is drawn."""
    shape = budget.check_temporary(shape, "the filled blob")
    if filler is None:
        return torch.full(shape, float(default_value), dtype=torch.float32)
    kind = filler.type or default_type
    out = torch.empty(shape, dtype=torch.float32)
    if kind == "constant":
        return out.fill_(filler.value)
    if kind == "uniform":
        return out.uniform_(filler.min, filler.max, generator=generator)
    if kind == "gaussian":
        out.normal_(filler.mean, filler.std, generator=generator)
        if filler.sparse >= 0:
            if len(shape) < 2 or shape[0] == 0:
                raise _err(ctx, "the gaussian filler's sparse option needs a blob of at least 2 axes")
            budget.check_temporary(shape, "the sparse filler's mask")
            keep = torch.rand(shape, generator=generator) < (filler.sparse / shape[0])
            out *= keep
        return out
    if kind == "positive_unitball":
        out.uniform_(0, 1, generator=generator)
        rows = out.reshape(shape[0] if shape else 1, -1)
        rows /= rows.sum(dim=1, keepdim=True)
        return out
    if kind == "xavier":
        a = math.sqrt(3.0 / _norm_n(filler, shape))
        return out.uniform_(-a, a, generator=generator)
    if kind == "msra":
        return out.normal_(0.0, math.sqrt(2.0 / _norm_n(filler, shape)), generator=generator)
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise _err(ctx, f"the bilinear filler needs a 4-D blob with square kernels, got shape {shape}")
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        xs = torch.arange(k, dtype=torch.float64)
        w1 = 1 - torch.abs(xs / f - c)
        kernel = (w1[:, None] * w1[None, :]).to(torch.float32)
        return out.copy_(kernel.expand(shape))
    if kind == "xy":
        return xy_fill(shape, ctx)
    raise _err(ctx, f"unknown filler type {kind!r} (expected constant, uniform, gaussian, "
                    f"positive_unitball, xavier, msra, bilinear or xy)")


def xy_fill(shape, ctx=None):
    """The fork's "xy" filler: channel 0 = column index, channel 1 = row index, for every image
    (the original offsets image n by n*c*H*W with the loop's channel c, so only image 0 of a
    batch gets the map; here every image does, as intended)."""
    if len(shape) != 4 or shape[1] != 2:
        raise _err(ctx, f"the xy filler needs a (N, 2, H, W) blob, got shape {tuple(shape)}")
    n, _, h, w = shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys]).unsqueeze(0).expand(n, 2, h, w).contiguous()


def _err(ctx, message):
    return ctx.error(message) if ctx is not None else ValueError(message)
