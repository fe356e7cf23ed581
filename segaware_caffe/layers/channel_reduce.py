"""ChannelReduce (segaware fork): SUM or MAX over contiguous blocks of channels."""
import torch

from ..layer import CaffeLayer, register_layer

_OPERATIONS = {0: "SUM", 1: "MAX"}  # ChannelReduceParameter.Op


@register_layer("ChannelReduce")
class ChannelReduce(CaffeLayer):
    """(N, C, H, W) -> (N, G, H, W), G = num_channels: output channel g reduces input channels
    [g*B, (g+1)*B), B = C / G. MAX routes the gradient to the winning channel (the original keeps
    the lowest on ties), SUM copies it to every channel of the block.

    The original's setup check is inverted (it aborts for num_channels == C and lets
    non-divisible C through); here num_channels == C is accepted (identity) and C must be a
    multiple of num_channels.
    """

    def __init__(self, *, num_channels=1, operation="MAX"):
        super().__init__()
        self.num_channels, self.operation = num_channels, operation

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.channel_reduce_param
        shape = tuple(ctx.bottom_shapes[0])
        if len(shape) != 4:
            raise ctx.error(f"expects a 4-D (N, C, H, W) bottom, got shape {shape}")
        channels, groups = shape[1], int(p.num_channels)
        if groups < 1 or channels % groups:
            raise ctx.error(f"channel_reduce_param.num_channels must divide the bottom's {channels} "
                            f"channels into equal blocks, got num_channels {groups}")
        return cls(num_channels=groups, operation=_OPERATIONS[p.operation])

    def forward(self, x):
        n, c, h, w = x.shape
        blocks = x.reshape(n, self.num_channels, c // self.num_channels, h, w)
        if self.operation == "SUM":
            return blocks.sum(2)
        return blocks.max(2).values

    def extra_repr(self):
        return f"num_channels={self.num_channels}, operation={self.operation}"
