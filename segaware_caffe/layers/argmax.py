"""ArgMax: indices (and optionally values) of the top_k largest entries. Forward only."""
import math

import torch

from ..layer import CaffeLayer, register_layer
from ..params import canonical_axis


def _top_k_desc(values, k, dim):
    """The k largest along `dim`, ranked by (value, index) descending like the original's
    partial_sort over (value, index) pairs: among equal values the higher index comes first."""
    size = values.shape[dim]
    flipped = values.flip(dim)
    top_values, flipped_index = torch.sort(flipped, dim=dim, descending=True, stable=True)
    top_values = top_values.narrow(dim, 0, k)
    index = (size - 1) - flipped_index.narrow(dim, 0, k)
    return top_values, index


@register_layer("ArgMax")
class ArgMax(CaffeLayer):
    """With `axis`: the top_k indices along it (values instead when out_max_val). Without:
    per item over all C*H*W values, top of shape (N, 1 or 2, top_k, 1...) holding indices, then
    values when out_max_val. Outputs are float like every Caffe blob. Forward only (the original
    has no backward)."""
    HAS_BACKWARD = False

    def __init__(self, *, top_k=1, axis=None, out_max_val=False):
        super().__init__()
        self.top_k, self.axis, self.out_max_val = top_k, axis, out_max_val

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.argmax_param
        shape = tuple(ctx.bottom_shapes[0])
        if p.top_k < 1:
            raise ctx.error(f"argmax_param.top_k must be >= 1, got {p.top_k}")
        axis = None
        if p.HasField("axis"):
            axis = canonical_axis(p.axis, len(shape), ctx, "argmax_param.axis")
            if p.top_k > shape[axis]:
                raise ctx.error(f"argmax_param.top_k {p.top_k} exceeds the size {shape[axis]} of "
                                f"axis {axis}")
        elif p.top_k > math.prod(shape[1:]):
            raise ctx.error(f"argmax_param.top_k {p.top_k} exceeds the {math.prod(shape[1:])} "
                            f"values per item of a {shape} bottom")
        return cls(top_k=int(p.top_k), axis=axis, out_max_val=bool(p.out_max_val))

    @torch.no_grad()        # the original has no backward: keep no graph
    def forward(self, x):
        if self.axis is not None:
            values, index = _top_k_desc(x, self.top_k, self.axis)
            return values if self.out_max_val else index.to(x.dtype)
        num = x.shape[0]
        values, index = _top_k_desc(x.reshape(num, -1), self.top_k, 1)
        rows = [index.to(x.dtype)] + ([values] if self.out_max_val else [])
        shape = [1] * max(x.dim(), 3)
        shape[0], shape[1], shape[2] = num, len(rows), self.top_k
        return torch.stack(rows, dim=1).reshape(shape)

    def extra_repr(self):
        parts = [f"top_k={self.top_k}"] if self.top_k != 1 else []
        parts += [f"axis={self.axis}"] if self.axis is not None else []
        parts += ["out_max_val=True"] if self.out_max_val else []
        return ", ".join(parts)
