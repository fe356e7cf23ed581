"""A declared input shape with a negative dimension is a build error naming the input, not a
torch RuntimeError from the first layer that allocates with it."""
import pytest

import segaware_caffe as sc


@pytest.mark.parametrize("declaration", [
    'input: "x" input_shape { dim: 2 dim: -1 dim: 3 dim: 3 }',
    'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: -1 dim: 3 dim: 3 } } }',
])
def test_negative_input_dimension(declaration):
    text = declaration + '\nlayer { name: "p" type: "PReLU" bottom: "x" top: "y" }\n'
    with pytest.raises(sc.NetBuildError, match=r"input blob 'x' is declared with a negative "
                                               r"dimension, shape \(2, -1, 3, 3\)"):
        sc.Net(text)
