"""PReLU (BVLC): parametric ReLU with a learned per-channel (or shared) slope."""
import torch

from ..fillers import fill_parameter
from ..layer import CaffeLayer, register_layer
from .convolution import optional_filler


@register_layer("PReLU")
class PReLU(CaffeLayer):
    """y = x if x > 0 else slope * x, slope per channel (axis 1), or one 0-axis blob with
    channel_shared. Default filler constant 0.25. dx = dy * ((x > 0) + slope * (x <= 0)),
    d slope = sum of dy * x over x <= 0."""
    SAME_SHAPE = True
    CAFFE_BLOBS = ("slope",)

    def __init__(self, *, channels, channel_shared=False):
        super().__init__()
        self.channel_shared = channel_shared
        self.slope = self.new_parameter(() if channel_shared else (channels,), "slope", 0.25)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        pp = layer_param.prelu_param
        shape = tuple(ctx.bottom_shapes[0])
        if len(shape) < 2:
            raise ctx.error(f"the bottom must have at least 2 axes (N, C, ...), got shape {shape}")
        layer = cls(channels=shape[1], channel_shared=pp.channel_shared)
        fill_parameter(layer.slope, optional_filler(pp, "filler"), ctx, default_value=0.25,
                       holds=0.25)
        return layer

    def forward(self, x):
        slope = self.slope if self.channel_shared else self.slope.reshape(1, -1, *[1] * (x.dim() - 2))
        return torch.where(x > 0, x, x * slope)

    def extra_repr(self):
        return "channel_shared=True" if self.channel_shared else f"channels={self.slope.numel()}"
