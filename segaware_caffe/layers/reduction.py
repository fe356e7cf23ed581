"""Reduction: SUM / ASUM / SUMSQ / MEAN over all axes from `axis` on, times coeff."""
import math

import numpy as np
import torch

from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis

_OPERATIONS = {1: "SUM", 2: "ASUM", 3: "SUMSQ", 4: "MEAN"}  # ReductionParameter.ReductionOp


@register_layer("Reduction")
class Reduction(CaffeLayer):
    """Top shape = bottom shape[:axis] (axis 0 -> a 0-axis scalar); MEAN is SUM times coeff/dim."""

    def __init__(self, *, operation="SUM", axis=0, coeff=1.0):
        super().__init__()
        self.operation, self.axis, self.coeff = operation, axis, coeff

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.reduction_param
        ndim = len(ctx.bottom_shapes[0])
        axis = canonical_axis(p.axis, ndim, ctx, "reduction_param.axis") if ndim else 0
        return cls(operation=_OPERATIONS[p.operation], axis=axis, coeff=float(np.float32(p.coeff)))

    def forward(self, x):
        rows = x.reshape(*x.shape[:self.axis], -1)
        if self.operation == "ASUM":
            rows = torch.abs(rows)
        elif self.operation == "SUMSQ":
            rows = rows * rows
        y = rows.sum(-1)
        coeff = self.coeff
        if self.operation == "MEAN":
            coeff = float(np.float32(coeff) / np.float32(math.prod(x.shape[self.axis:])))
        return y * coeff if coeff != 1 else y

    def extra_repr(self):
        coeff = f", coeff={self.coeff}" if self.coeff != 1 else ""
        return f"operation={self.operation}, axis={self.axis}{coeff}"
