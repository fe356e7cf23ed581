"""Split: hand one blob to several consumers (explicit layer, or inserted by the net builder)."""
from ..layer import CaffeLayer, register_layer


@register_layer("Split")
class Split(CaffeLayer):
    """Every top is a view of the bottom (no copy); autograd sums the consumers' gradients into
    the bottom, while each top keeps its own gradient (Caffe's per-top diff)."""
    TOPS = (1, None)

    def __init__(self, *, num_tops=1):
        super().__init__()
        self.num_tops = num_tops

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls(num_tops=len(ctx.top_names))

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])] * self.num_tops

    def forward(self, x):
        # one top is one tensor: the builder wires a single-top layer's result to its top as is
        if self.num_tops == 1:
            return x.view_as(x)
        return tuple(x.view_as(x) for _ in range(self.num_tops))

    def extra_repr(self):
        return f"num_tops={self.num_tops}"
