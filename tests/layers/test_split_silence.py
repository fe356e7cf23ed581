"""Split and Silence."""

import torch

from segaware_caffe.layer import layer_class

from tests.layers.helpers import build, randn


def test_split_tops_share_data_and_keep_their_own_gradients():
    layer = build('name: "s" type: "Split" bottom: "x" top: "a" top: "b" top: "c"', [(2, 3)])
    x = randn(2, 3, requires_grad=True)
    tops = layer(x)
    assert len(tops) == 3 and all(t.data_ptr() == x.data_ptr() for t in tops)
    for t in tops:
        t.retain_grad()
    (tops[0] * 2 + tops[2] * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((2, 3), 5.0, dtype=torch.float64))
    assert tops[0].grad.eq(2).all() and tops[1].grad is None and tops[2].grad.eq(3).all()


def test_silence_has_no_tops():
    layer = build('name: "s" type: "Silence" bottom: "x" bottom: "y"', [(2, 3), (4,)])
    assert layer(torch.ones(2, 3), torch.ones(4)) == ()
    assert layer.output_shapes([(2, 3), (4,)]) == []
    assert layer_class("Silence").TOPS == (0, 0)
