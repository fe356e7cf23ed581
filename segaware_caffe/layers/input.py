"""Input (BVLC): tops fed by the caller; also what legacy net-level inputs become."""
from ..layer import CaffeLayer, register_layer


@register_layer("Input")
class Input(CaffeLayer):
    """The builder turns its tops into graph inputs; the module only records the declared
    (default) shapes."""
    BOTTOMS = (0, 0)
    TOPS = (1, None)
    NET_INPUT = True

    def __init__(self, *, shapes):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]

    @classmethod
    def from_proto(cls, layer_param, ctx):
        declared = [tuple(int(d) for d in s.dim) for s in layer_param.input_param.shape]
        tops = len(ctx.top_names)
        if len(declared) not in (1, tops):
            raise ctx.error(f"input_param has {len(declared)} shapes for {tops} tops "
                            f"(expected 1 shared shape or one per top)")
        if len(declared) == 1:
            declared = declared * tops
        return cls(shapes=declared)

    def output_shapes(self, bottom_shapes):
        return list(self.shapes)

    def forward(self):  # never called: the builder wires Input tops to graph inputs
        raise RuntimeError("Input layers are fed through Net.forward(**inputs)")
