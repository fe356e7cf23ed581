"""LRN across and within channels against references."""
import itertools

import torch
import torch.nn.functional as F


from tests.layers.helpers import build, randn


def test_lrn_across_channels_reference():
    layer = build('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 3 '
                  'alpha: 0.6 beta: 0.8 k: 1.5 }', [(2, 5, 3, 4)]).double()
    x = randn(2, 5, 3, 4)
    ref = torch.empty_like(x)
    for c in range(5):
        window = x[:, max(c - 1, 0):c + 2]
        ref[:, c] = x[:, c] * (1.5 + 0.6 / 3 * (window ** 2).sum(1)) ** -0.8
    torch.testing.assert_close(layer(x), ref)
    torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)


def test_lrn_within_channel_reference():
    layer = build('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 3 '
                  'alpha: 0.6 beta: 0.8 k: 7 norm_region: WITHIN_CHANNEL }', [(1, 2, 4, 5)]).double()
    x = randn(1, 2, 4, 5)
    padded = F.pad(x ** 2, (1, 1, 1, 1))
    ref = torch.empty_like(x)
    for i, j in itertools.product(range(4), range(5)):
        ref[:, :, i, j] = x[:, :, i, j] * (1 + 0.6 * padded[:, :, i:i + 3, j:j + 3].sum((2, 3)) / 9) ** -0.8
    torch.testing.assert_close(layer(x), ref)
    torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)


def test_lrn_windows_wider_than_the_blob():
    """Fewer channels (or a smaller image) than local_size: the zero padding makes up the
    window, as in Caffe."""
    layer = build('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 5 '
                  'alpha: 0.5 beta: 0.75 k: 2 }', [(2, 2, 3, 4)]).double()
    x = randn(2, 2, 3, 4)
    ref = x * (2 + 0.5 / 5 * (x ** 2).sum(1, keepdim=True)) ** -0.75   # every window holds both
    torch.testing.assert_close(layer(x), ref)
    within = build('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 7 '
                   'alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }', [(1, 2, 2, 3)]).double()
    x = randn(1, 2, 2, 3)
    ref = x * (1 + 0.5 * (x ** 2).sum((2, 3), keepdim=True) / 49) ** -0.75
    torch.testing.assert_close(within(x), ref)
