"""Filter: keep the items whose selector is non-zero."""
import torch

from ..layer import CaffeLayer, register_layer


@register_layer("Filter")
class Filter(CaffeLayer):
    """Bottoms x_1 .. x_k and a selector (N, 1, ...) last; top t is x_t restricted to the items
    whose selector value is non-zero (any non-zero value, 0.5 or NaN included), in order. The
    number of items of the tops depends on the selector's values: the build-time shapes are the
    bottoms' (all N items, as the original sets its tops up), each forward gives the data's.
    Backward: the kept items get their top's gradient, the others 0; none to the selector."""
    BOTTOMS = (2, None)
    TOPS = (1, None)
    NO_GRAD_BOTTOMS = (-1,)

    def __init__(self):
        super().__init__()

    @classmethod
    def from_proto(cls, layer_param, ctx):
        shapes = [tuple(s) for s in ctx.bottom_shapes]
        if len(ctx.top_names) != len(shapes) - 1:
            raise ctx.error(f"needs one top per filtered bottom ({len(shapes) - 1}, the last bottom "
                            f"being the selector), got {len(ctx.top_names)} tops")
        selector = shapes[-1]
        if not selector or any(d != 1 for d in selector[1:]):
            raise ctx.error(f"the selector (last bottom) must have shape (N, 1, ...), got {selector}")
        for i, shape in enumerate(shapes[:-1]):
            if not shape or shape[0] != selector[0]:
                raise ctx.error(f"bottom {i} {shape} must have as many items as the selector "
                                f"{selector} (first dimension)")
        return cls()

    def forward(self, *bottoms):
        *data, selector = bottoms
        keep = torch.nonzero(selector.detach().reshape(selector.shape[0]) != 0).squeeze(1)
        tops = tuple(x.index_select(0, keep) for x in data)
        return tops[0] if len(tops) == 1 else tops

    def output_shapes(self, bottom_shapes):
        return [tuple(s) for s in bottom_shapes[:-1]]
