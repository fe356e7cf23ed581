"""Eltwise PROD (both gradient forms), SUM with coefficients, MAX routing."""
import math

import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import build, randn


def eltwise(params, n=3, shape=(2, 3, 4, 5)):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(n))
    return build(f'name: "e" type: "Eltwise" {bottoms} top: "y" eltwise_param {{ {params} }}',
                 [shape] * n)


@pytest.mark.parametrize("params", ["operation: PROD", "operation: PROD stable_prod_grad: false",
                                    "operation: SUM coeff: 0.5 coeff: -2 coeff: 3",
                                    "operation: SUM", "operation: MAX"])
def test_eltwise_gradcheck(params):
    layer = eltwise(params)
    xs = [randn(2, 3, 4, 5, seed=i).requires_grad_(True) for i in range(3)]
    assert torch.autograd.gradcheck(layer, xs)


def test_eltwise_prod_gradients_at_zero():
    a = torch.tensor([0.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0, 5.0], requires_grad=True)
    eltwise("operation: PROD", n=2, shape=(2,))(a, b).sum().backward()
    assert a.grad.tolist() == [3.0, 5.0] and b.grad.tolist() == [0.0, 2.0]
    a.grad = b.grad = None
    eltwise("operation: PROD stable_prod_grad: false", n=2, shape=(2,))(a, b).sum().backward()
    assert math.isnan(a.grad[0]) and a.grad[1] == 5.0 and b.grad.tolist() == [0.0, 2.0]


def test_eltwise_max_routes_whole_gradient_to_one_bottom():
    xs = [torch.tensor([1.0, 5.0, 2.0], requires_grad=True), torch.tensor([4.0, 5.0, 0.0], requires_grad=True),
          torch.tensor([3.0, 1.0, 2.0], requires_grad=True)]
    y = eltwise("operation: MAX", shape=(3,))(*xs)
    assert y.tolist() == [4.0, 5.0, 2.0]
    y.backward(torch.tensor([10.0, 20.0, 30.0]))
    routed = torch.stack([x.grad for x in xs])
    assert routed.sum(0).tolist() == [10.0, 20.0, 30.0]       # never split between tied bottoms
    assert routed[1, 0] == 10.0


@pytest.mark.parametrize("params, shapes, match", [
    ("operation: PROD coeff: 1 coeff: 2", [(2, 3)] * 2, r"e \(Eltwise\): eltwise_param.coeff is only allowed with operation SUM"),
    ("operation: MAX coeff: 1 coeff: 2", [(2, 3)] * 2, r"only allowed with operation SUM, got operation MAX"),
    ("coeff: 1", [(2, 3)] * 2, r"one value per bottom: got 1 values for 2 bottoms"),
    ("operation: SUM", [(2, 3), (2, 4)], r"same shape: bottom 'b1' has \(2, 4\)"),
])
def test_eltwise_errors(params, shapes, match):
    with pytest.raises(LayerSetupError, match=match):
        build(f'name: "e" type: "Eltwise" bottom: "b0" bottom: "b1" top: "y" eltwise_param {{ {params} }}',
              shapes)
