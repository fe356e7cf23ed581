import torch

from ..layer import CaffeLayer, register_layer


@register_layer("ReLU")
class ReLU(CaffeLayer):
    """y = x if x > 0 else negative_slope * x; dx = dy * ((x > 0) + slope * (x <= 0))."""
    SAME_SHAPE = True

    def __init__(self, *, negative_slope=0.0):
        super().__init__()
        self.negative_slope = negative_slope

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls(negative_slope=layer_param.relu_param.negative_slope)

    def forward(self, x):
        if self.negative_slope == 0:
            return torch.relu(x)
        return torch.where(x > 0, x, x * self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}" if self.negative_slope else ""
