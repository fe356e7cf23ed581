"""PReLU."""

import torch


from tests.layers.helpers import build, randn


def test_prelu():
    layer = build('name: "p" type: "PReLU" bottom: "x" top: "y"', [(2, 3, 4)]).double()
    assert layer.slope.tolist() == [0.25] * 3
    with torch.no_grad():
        layer.slope.copy_(torch.tensor([0.1, -0.5, 2.0]))
    x = randn(2, 3, 4)
    torch.testing.assert_close(layer(x), torch.where(x > 0, x, x * layer.slope.detach().reshape(1, 3, 1)))
    torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)
    shared = build('name: "p" type: "PReLU" bottom: "x" top: "y" prelu_param { channel_shared: true '
                   'filler { value: 0.5 } }', [(2, 3)])
    assert shared.slope.shape == () and shared.slope.item() == 0.5
