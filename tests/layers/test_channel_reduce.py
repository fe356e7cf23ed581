"""The fork's ChannelReduce."""

import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import build, randn


def channel_reduce(params, shape):
    return build(f'name: "cr" type: "ChannelReduce" bottom: "x" top: "y" channel_reduce_param {{ {params} }}',
                 [shape])


@pytest.mark.parametrize("operation", ["SUM", "MAX"])
def test_channel_reduce_blocks_and_gradcheck(operation):
    layer = channel_reduce(f"num_channels: 3 operation: {operation}", (2, 12, 3, 5))
    x = randn(2, 12, 3, 5, requires_grad=True)
    blocks = x.reshape(2, 3, 4, 3, 5)
    expected = blocks.sum(2) if operation == "SUM" else blocks.max(2).values
    torch.testing.assert_close(layer(x), expected)
    assert torch.autograd.gradcheck(layer, (x,))


def test_channel_reduce_defaults_identity_and_errors():
    x = randn(1, 4, 2, 2)
    torch.testing.assert_close(channel_reduce("", x.shape)(x), x.max(1, keepdim=True).values)
    assert torch.equal(channel_reduce("num_channels: 4 operation: SUM", x.shape)(x), x)   # the original's check rejects this
    with pytest.raises(LayerSetupError, match=r"cr \(ChannelReduce\): channel_reduce_param.num_channels must "
                                              r"divide the bottom's 4 channels into equal blocks, got num_channels 3"):
        channel_reduce("num_channels: 3", x.shape)
    with pytest.raises(LayerSetupError, match=r"num_channels 8"):
        channel_reduce("num_channels: 8", x.shape)
    with pytest.raises(LayerSetupError, match=r"expects a 4-D \(N, C, H, W\) bottom, got shape \(4, 2\)"):
        channel_reduce("", (4, 2))
