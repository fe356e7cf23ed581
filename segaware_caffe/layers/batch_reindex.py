"""BatchReindex: gather items of the batch by an index vector."""
import torch

from ..layer import CaffeLayer, register_layer


@register_layer("BatchReindex")
class BatchReindex(CaffeLayer):
    """Bottoms x (N, ...) and idx (M); y[i] = x[int(idx[i])], shape (M, ...). Every index must
    satisfy 0 <= idx < N (checked on the float values, as the original does). Backward: each item
    of x gets the sum of the gradients of the positions that picked it (0 if none); none to idx."""
    BOTTOMS = (2, 2)
    NO_GRAD_BOTTOMS = (1,)

    def __init__(self, *, where="BatchReindex"):
        super().__init__()
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        x, idx = (tuple(s) for s in ctx.bottom_shapes)
        if len(idx) != 1:
            raise ctx.error(f"the index bottom must have 1 axis (M,), got shape {idx}")
        if not x:
            raise ctx.error("the data bottom must have at least 1 axis (its items)")
        return cls(where=f"{ctx.name} ({ctx.type})")

    def forward(self, x, idx):
        values = idx.detach()
        bad = (values < 0) | (values >= x.shape[0])
        if bool(bad.any()):
            raise ValueError(f"{self.where}: index {values[bad][0].item():g} is outside [0, "
                             f"{x.shape[0]}) (the data bottom's batch size)")
        return x.index_select(0, values.to(torch.int64))

    def output_shapes(self, bottom_shapes):
        x, idx = bottom_shapes
        return [tuple(idx[:1]) + tuple(x[1:])]
