"""Swish (BVLC Caffe): y = x * sigmoid(beta * x)."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer


class _SwishFunction(torch.autograd.Function):
    """Backward as the original writes it from the top and the sigmoid it kept:
    dx = dy * (beta*y + s*(1 - beta*y)), s = sigmoid(beta*x) (the exact derivative)."""

    @staticmethod
    def forward(ctx, x, beta):
        s = torch.sigmoid(x * beta)
        y = x * s
        ctx.save_for_backward(y, s)
        ctx.beta = beta
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, s = ctx.saved_tensors
        beta_y = y * ctx.beta
        return grad_y * (beta_y + s * (1 - beta_y)), None


@register_layer("Swish")
class Swish(CaffeLayer):
    """y = x * sigmoid(beta x) (beta default 1)."""
    SAME_SHAPE = True

    def __init__(self, *, beta=1.0):
        super().__init__()
        self.beta = float(np.float32(beta))

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls(beta=layer_param.swish_param.beta)

    def forward(self, x):
        return _SwishFunction.apply(x, self.beta)

    def extra_repr(self):
        return f"beta={self.beta}" if self.beta != 1 else ""
