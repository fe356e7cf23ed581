"""Reshape (0 and -1 dims, axis/num_axes ranges) and Flatten."""
import math

import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import build


@pytest.mark.parametrize("params, shape, expected", [
    ("shape { dim: 0 dim: -1 dim: 4 }", (2, 3, 4, 6), (2, 18, 4)),
    ("shape { dim: -1 }", (2, 3, 4), (24,)),
    ("shape { dim: 2 dim: 2 } axis: 1 num_axes: 1", (3, 4, 5), (3, 2, 2, 5)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (3, 4), (1, 3, 4)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (3, 4), (3, 4, 1)),
    ("shape { dim: 0 dim: 0 dim: -1 } axis: 1", (2, 3, 4, 5), (2, 3, 4, 5)),
    ("shape { dim: 6 dim: -1 } axis: -4", (2, 3, 4, 5), (2, 6, 10)),
])
def test_reshape_shapes(params, shape, expected):
    layer = build(f'name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param {{ {params} }}', [shape])
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    y = layer(x)
    assert tuple(y.shape) == expected and y.data_ptr() == x.data_ptr()
    assert layer.output_shapes([shape]) == [expected]


@pytest.mark.parametrize("params, match", [
    ("shape { dim: -1 dim: -1 }", r"r \(Reshape\): reshape_param.shape may infer \(-1\) at most one dim"),
    ("shape { dim: 5 dim: -1 }", r"cannot infer the -1 dim: bottom count 24"),
    ("shape { dim: 5 dim: 5 }", r"top shape \(5, 5\) has 25 elements but the bottom \(2, 3, 4\) has 24"),
    ("shape { dim: -2 }", r"dims must be >= -1"),
    ("shape { dim: 1 } axis: 5", r"reshape_param.axis 5 is out of range"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", r"dim 3 is 0 \(copy\) but the bottom has no axis 3"),
])
def test_reshape_errors(params, match):
    with pytest.raises(LayerSetupError, match=match):
        build(f'name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param {{ {params} }}', [(2, 3, 4)])


def test_flatten_axes():
    def flatten(params, shape):
        return build(f'name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param {{ {params} }}', [shape])
    x = torch.zeros(2, 3, 4, 5)
    assert flatten("", x.shape)(x).shape == (2, 60)
    assert flatten("axis: 0 end_axis: 1", x.shape)(x).shape == (6, 4, 5)
    assert flatten("axis: -3 end_axis: -2", x.shape)(x).shape == (2, 12, 5)
    assert flatten("axis: 2 end_axis: 2", x.shape)(x).shape == (2, 3, 4, 5)
    with pytest.raises(LayerSetupError, match=r"f \(Flatten\): flatten_param.end_axis .* must not come before axis"):
        flatten("axis: 2 end_axis: 1", x.shape)
    with pytest.raises(LayerSetupError, match=r"flatten_param.axis 4 is out of range for a 4-D bottom"):
        flatten("axis: 4", x.shape)
