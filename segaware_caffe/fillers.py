"""Caffe's weight fillers (FillerParameter), with its fan-in/fan-out rules.

Random fillers draw from torch's generator (Caffe's boost stream cannot be reproduced); golden
tests load explicit weights.
"""
import contextlib
import contextvars
import math

import torch
from torch import nn

from . import budget

# the net builder's deferred fills (see deferred_fills), None outside it
_PENDING = contextvars.ContextVar("segaware_caffe_pending_fills", default=None)


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
    if (filler.type or default_type) == "xy":
        # computed, not drawn: returned as made (a copy into a fresh buffer would be one more
        # op for tracers and ONNX export)
        return xy_fill(shape, ctx)
    return _fill_into(torch.empty(shape, dtype=torch.float32), filler, ctx, default_type,
                      generator)


def constant_parameter(shape, value=0.0):
    """A float32 Parameter of `shape` holding `value`, for a layer's constructor. While the net
    builder sets up a layer (deferred_fills) its memory is only reserved: the builder writes it
    after parameter sharing, so a blob that is replaced by a shared one is never written."""
    pending = _PENDING.get()
    if pending is None:
        return nn.Parameter(torch.full(tuple(shape), float(value), dtype=torch.float32))
    param = nn.Parameter(torch.empty(tuple(shape), dtype=torch.float32))
    pending[id(param)] = _Pending(param, float(value))
    return param


class _Pending:
    """A parameter whose values the builder writes later: its constructor's constant, or the
    filler given to fill_parameter."""

    def __init__(self, param, value):
        self.param, self.value = param, value
        self.version = param._version
        self.filler = self.ctx = self.generator = None

    def write(self):
        if self.param._version != self.version:
            return                                # the layer wrote it itself
        with torch.no_grad():
            if self.filler is None or (self.ctx is not None and self.ctx.weights_follow):
                self.param.fill_(self.value)      # (the weights file's values come next)
            else:
                _fill_into(self.param, self.filler, self.ctx, "constant", self.generator)


@contextlib.contextmanager
def deferred_fills():
    """Within it, constant_parameter reserves memory and fill_parameter records its filler;
    `materialise(module)` then writes the parameters the module still holds."""
    pending = {}
    token = _PENDING.set(pending)
    try:
        yield _Deferred(pending)
    finally:
        _PENDING.reset(token)


class _Deferred:
    def __init__(self, pending):
        self.pending = pending

    def materialise(self, module):
        """Write the pending parameters `module` holds; forget those it no longer holds (a
        shared blob took their place)."""
        held = {id(p) for p in module.parameters()}
        for key, entry in list(self.pending.items()):
            if key in held:
                entry.write()
        self.pending.clear()


def fill_parameter(param, filler, ctx=None, default_value=0.0, holds=None, generator=None):
    """Fill `param` in place with what fill() would return, skipping work that changes nothing:
    a constant equal to `holds` (the value the layer's constructor gave the parameter), and any
    filler at all when the net's weights file sets this layer's blobs right after set-up
    (`ctx.weights_follow`); the filler is still checked then. A parameter made by
    constant_parameter while the builder defers fills gets its filler recorded instead."""
    value = float(default_value) if filler is None else None
    if filler is not None and (filler.type or "constant") == "constant":
        value = float(filler.value)
    pending = _PENDING.get()
    entry = pending.get(id(param)) if pending is not None else None
    if entry is not None and entry.param is param:
        if value is not None:
            entry.value = value
        else:
            _fill_into(param, filler, ctx, "constant", generator, draw=False)
            entry.filler, entry.ctx, entry.generator = filler, ctx, generator
        return param
    with torch.no_grad():
        if value is not None:
            if ctx is None or not ctx.weights_follow:
                if holds is None or value != holds:
                    param.fill_(value)
            return param
        if ctx is not None and ctx.weights_follow:
            _fill_into(param, filler, ctx, "constant", generator, draw=False)
            return param
        if param.dtype == torch.float32 and param.is_contiguous():
            return _fill_into(param, filler, ctx, "constant", generator)
        param.copy_(_fill_into(torch.empty(param.shape, dtype=torch.float32), filler, ctx,
                               "constant", generator))
        return param


def _fill_into(out, filler, ctx, default_type, generator, draw=True):
    """Write `filler`'s values into the float32 tensor `out` (draw=False: only check that the
    filler can fill it)."""
    shape = tuple(out.shape)
    kind = filler.type or default_type
    if kind == "constant":
        return out.fill_(filler.value) if draw else out
    if kind == "uniform":
        return out.uniform_(filler.min, filler.max, generator=generator) if draw else out
    if kind == "gaussian":
        if filler.sparse >= 0 and (len(shape) < 2 or shape[0] == 0):
            raise _err(ctx, "the gaussian filler's sparse option needs a blob of at least 2 axes")
        if not draw:
            return out
        out.normal_(filler.mean, filler.std, generator=generator)
        if filler.sparse >= 0:
            budget.check_temporary(shape, "the sparse filler's mask")
            keep = torch.rand(shape, generator=generator) < (filler.sparse / shape[0])
            out *= keep
        return out
    if kind == "positive_unitball":
        if draw:
            out.uniform_(0, 1, generator=generator)
            rows = out.reshape(shape[0] if shape else 1, -1)
            rows /= rows.sum(dim=1, keepdim=True)
        return out
    if kind == "xavier":
        a = math.sqrt(3.0 / _norm_n(filler, shape))
        return out.uniform_(-a, a, generator=generator) if draw else out
    if kind == "msra":
        return out.normal_(0.0, math.sqrt(2.0 / _norm_n(filler, shape)),
                           generator=generator) if draw else out
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise _err(ctx, f"the bilinear filler needs a 4-D blob with square kernels, got shape {shape}")
        if not draw:
            return out
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        xs = torch.arange(k, dtype=torch.float64)
        w1 = 1 - torch.abs(xs / f - c)
        kernel = (w1[:, None] * w1[None, :]).to(torch.float32)
        return out.copy_(kernel.expand(shape))
    if kind == "xy":
        values = xy_fill(shape, ctx)
        return out.copy_(values) if draw else out
    raise _err(ctx, f"unknown filler type {kind!r} (expected constant, uniform, gaussian, "
                    f"positive_unitball, xavier, msra, bilinear or xy)")


def xy_fill(shape, ctx=None):
    """The fork's "xy" filler: channel 0 = column index, channel 1 = row index, for every image
    (the original offsets image n by n*c*H*W with the loop's channel c, so only image 0 of a
    batch gets the map; here every image does, as intended)."""
    if len(shape) != 4 or shape[1] != 2:
        raise _err(ctx, f"the xy filler needs a (N, 2, H, W) blob, got shape {tuple(shape)}")
    n, _, h, w = (int(d) for d in shape)
    if n == 0:
        return torch.empty((0, 2, h, w), dtype=torch.float32)
    budget.check_temporary((2, h, w), "the xy filler's coordinate map")
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys]).unsqueeze(0).expand(n, 2, h, w).contiguous()


def _err(ctx, message):
    return ctx.error(message) if ctx is not None else ValueError(message)
