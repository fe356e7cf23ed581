"""Silence: consume blobs nobody else reads (so they are not net outputs)."""
from ..layer import CaffeLayer, register_layer


@register_layer("Silence")
class Silence(CaffeLayer):
    """No tops; the bottoms get no gradient (the original writes zeros into their diffs)."""
    BOTTOMS = (0, None)
    TOPS = (0, 0)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls()

    def forward(self, *bottoms):
        return ()

    def output_shapes(self, bottom_shapes):
        return []
