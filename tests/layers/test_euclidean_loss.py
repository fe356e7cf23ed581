"""EuclideanLoss."""

import pytest
import torch

from segaware_caffe import LayerSetupError
from segaware_caffe.layer import layer_class

from tests.layers.helpers import build, randn


def test_euclidean_loss():
    layer = build('name: "e" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"', [(4, 3), (4, 3, 1, 1)])
    assert layer_class("EuclideanLoss").IS_LOSS
    a, b = randn(4, 3, seed=1, requires_grad=True), randn(4, 3, 1, 1, seed=2, requires_grad=True)
    loss = layer(a, b)
    assert loss.shape == () and loss.item() == pytest.approx(((a - b.reshape(4, 3)) ** 2).sum().item() / 8)
    assert torch.autograd.gradcheck(layer, (a, b))
    with pytest.raises(LayerSetupError, match=r"e \(EuclideanLoss\): bottoms must have the same number of values per item"):
        build('name: "e" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"', [(4, 3), (4, 2)])
