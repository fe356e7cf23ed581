"""Two tiny layer types registered only for the solver tests (names no Caffe net uses), so the
solver machinery can be checked against a float64 reference with analytic gradients."""
import torch
from torch import nn

from segaware_caffe.layer import CaffeLayer, register_layer, registered_types

TOY_NET = """
name: "toy"
input: "x" input_shape { dim: 4 dim: 3 }
input: "y" input_shape { dim: 4 dim: 2 }
layer { name: "fc" type: "SolverTestLinear" bottom: "x" top: "fc"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 } }
layer { name: "frozen" type: "SolverTestLinear" bottom: "fc" top: "out"
  param { lr_mult: 0 } param { lr_mult: 0 } }
layer { name: "loss" type: "SolverTestSquareLoss" bottom: "fc" bottom: "y" top: "loss" }
"""


class Linear(CaffeLayer):
    """top = x @ W.T + b with W (2, in) = 0.1*(i - j), b = (0.5, -0.25) (deterministic)."""
    CAFFE_BLOBS = ("weight", "bias")

    def __init__(self, *, in_features):
        super().__init__()
        rows = torch.arange(2, dtype=torch.float32)[:, None]
        cols = torch.arange(in_features, dtype=torch.float32)[None, :]
        self.weight = nn.Parameter(0.1 * (rows - cols) + 0.05)
        self.bias = nn.Parameter(torch.tensor([0.5, -0.25]))

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls(in_features=ctx.bottom_shapes[0][1])

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class SquareLoss(CaffeLayer):
    """0.5 * sum((a - b)^2) / N."""
    BOTTOMS = (2, 2)
    IS_LOSS = True

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls()

    def forward(self, a, b):
        return 0.5 * ((a - b) ** 2).sum() / a.shape[0]


if "SolverTestLinear" not in registered_types():
    register_layer("SolverTestLinear")(Linear)
    register_layer("SolverTestSquareLoss")(SquareLoss)
