"""Reduction over the trailing axes."""

import pytest
import torch


from tests.layers.helpers import build, randn


@pytest.mark.parametrize("operation, reference", [
    ("SUM", lambda x: x.sum(-1)), ("ASUM", lambda x: x.abs().sum(-1)),
    ("SUMSQ", lambda x: (x * x).sum(-1)), ("MEAN", lambda x: x.mean(-1)),
])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reduction(operation, reference, axis):
    layer = build(f'name: "r" type: "Reduction" bottom: "x" top: "y" reduction_param {{ '
                  f'operation: {operation} axis: {axis} coeff: -1.5 }}', [(2, 3, 4)])
    x = randn(2, 3, 4, requires_grad=True)
    start = axis % 3
    expected = -1.5 * reference(x.reshape(*x.shape[:start], -1))
    torch.testing.assert_close(layer(x), expected)
    assert torch.autograd.gradcheck(layer, (x,))
