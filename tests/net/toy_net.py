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


def simple_layer(type_name, function, check=None, **facts):
    """Register a parameter-less layer type computing `function(*bottoms)`, with the given class
    facts; `check(ctx)` may raise ctx.error at set-up."""
    def from_proto(cls, layer_param, ctx):
        if check is not None:
            check(ctx)
        return cls()
    attributes = dict(facts, from_proto=classmethod(from_proto),
                      forward=lambda self, *bottoms: function(*bottoms))
    return register_layer(type_name)(type(type_name, (CaffeLayer,), attributes))


def _equal_shapes(ctx):
    if ctx.bottom_shapes[0] != ctx.bottom_shapes[1]:
        raise ctx.error(f"bottoms must have equal shapes, got {ctx.bottom_shapes}")


Add = simple_layer("TestAdd", lambda a, b: a + b, _equal_shapes, BOTTOMS=(2, 2))
SumLoss = simple_layer("TestSumLoss", lambda x: x.sum(), IS_LOSS=True)
# y = a, refusing a gradient into the second bottom (an index, say)
TakeFirst = simple_layer("TestTakeFirst", lambda a, index: a * (1 + 0 * index), BOTTOMS=(2, 2),
                         NO_GRAD_BOTTOMS=(1,))
NoBackward = simple_layer("TestNoBackward", lambda x: 2 * x, HAS_BACKWARD=False)

# Im2parity (no backward) behind a learnable Scale: a gradient reaching it is refused
REFUSING_NET = """
name: "t"
input: "x" input_shape { dim: 4 }
layer { name: "w" type: "Scale" bottom: "x" top: "xw" scale_param { axis: 0 num_axes: 0 } }
layer { name: "r" type: "Reshape" bottom: "xw" top: "xw4"
        reshape_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }
layer { name: "parity" type: "Im2parity" bottom: "xw4" top: "par"
        convolution_param { kernel_size: 1 } }
"""


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
