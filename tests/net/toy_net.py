"""Small layer types (names no Caffe net uses) and a net of them, registered once for the net
tests, independent of the library's layers."""
import torch

from segaware_caffe.layer import CaffeLayer, register_layer


@register_layer("TestMulWeight")
class MulWeight(CaffeLayer):
    """y = x * w (w of shape (C,)), used to exercise parameters."""
    CAFFE_BLOBS = ("weight",)

    def __init__(self, *, channels, value):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((channels,), float(value)))

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls(channels=ctx.bottom_shapes[0][1], value=2.0)

    def forward(self, x):
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


@register_layer("TestAdd")
class Add(CaffeLayer):
    BOTTOMS = (2, 2)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        if ctx.bottom_shapes[0] != ctx.bottom_shapes[1]:
            raise ctx.error(f"bottoms must have equal shapes, got {ctx.bottom_shapes}")
        return cls()

    def forward(self, a, b):
        return a + b


@register_layer("TestSumLoss")
class SumLoss(CaffeLayer):
    IS_LOSS = True

    @classmethod
    def from_proto(cls, layer_param, ctx):
        return cls()

    def forward(self, x):
        return x.sum()


NET = """
name: "tiny"
input: "data"
input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }
layer { name: "a" type: "TestMulWeight" bottom: "data" top: "a" param { lr_mult: 2 decay_mult: 0 name: "shared_w" } }
layer { name: "relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "TestMulWeight" bottom: "a" top: "b" param { name: "shared_w" } }
layer { name: "c" type: "TestAdd" bottom: "a" bottom: "b" top: "c" }
layer { name: "train_only" type: "TestSumLoss" bottom: "c" top: "loss" include { phase: TRAIN } }
layer { name: "staged" type: "ReLU" bottom: "c" top: "staged" include { stage: "extra" } }
layer { name: "leveled" type: "ReLU" bottom: "c" top: "leveled" exclude { min_level: 1 } }
"""
