"""Parameter (BVLC Caffe): a learnable blob given to the net as a top."""

from ..layer import CaffeLayer, register_layer


@register_layer("Parameter")
class Parameter(CaffeLayer):
    """No bottoms; the top is the layer's one blob (of parameter_param.shape), whose diff is the
    top's diff. The blob starts at zero, as a fresh Caffe blob does, until weights are loaded.
    A shape with no dims is a 0-axis blob holding one value."""
    BOTTOMS = (0, 0)
    CAFFE_BLOBS = ("blob",)

    def __init__(self, *, shape):
        super().__init__()
        self.blob = self.new_parameter(shape, "blob")

    @classmethod
    def from_proto(cls, layer_param, ctx):
        dims = [int(d) for d in layer_param.parameter_param.shape.dim]
        if any(d < 0 for d in dims):
            raise ctx.error(f"parameter_param.shape dims must be >= 0, got {dims}")
        return cls(shape=dims)

    def forward(self):
        return self.blob

    def output_shapes(self, bottom_shapes):
        return [tuple(self.blob.shape)]

    def extra_repr(self):
        return f"shape={tuple(self.blob.shape)}"
