"""Tile, Slice and Concat: layouts, gradients and errors."""

import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import build, randn


def test_tile_layout_and_gradient():
    layer = build('name: "t" type: "Tile" bottom: "x" top: "y" tile_param { axis: 1 tiles: 3 }', [(2, 2, 1)])
    x = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]], requires_grad=True)
    y = layer(x)
    assert y[:, :, 0].tolist() == [[1, 2, 1, 2, 1, 2], [3, 4, 3, 4, 3, 4]]
    y.backward(torch.arange(12.0).reshape(2, 6, 1))
    assert x.grad[:, :, 0].tolist() == [[0 + 2 + 4, 1 + 3 + 5], [6 + 8 + 10, 7 + 9 + 11]]
    negative = build('name: "t" type: "Tile" bottom: "x" top: "y" tile_param { axis: -1 tiles: 2 }', [(2, 3)])
    assert negative(torch.ones(2, 3)).shape == (2, 6)
    assert torch.autograd.gradcheck(layer, (randn(2, 2, 3, requires_grad=True),))


@pytest.mark.parametrize("params, match", [
    ("axis: 1", r"t \(Tile\): tile_param.tiles is required"),
    ("tiles: 0", r"tile_param.tiles must be > 0, got 0"),
    ("tiles: 2 axis: 4", r"t \(Tile\): tile_param.axis 4 is out of range for a 3-D bottom"),
])
def test_tile_errors(params, match):
    with pytest.raises(LayerSetupError, match=match):
        build(f'name: "t" type: "Tile" bottom: "x" top: "y" tile_param {{ {params} }}', [(2, 3, 4)])


def slice_layer(params, shape=(2, 6, 3), tops=3):
    top_text = " ".join(f'top: "t{i}"' for i in range(tops))
    return build(f'name: "s" type: "Slice" bottom: "x" {top_text} slice_param {{ {params} }}', [shape])


def test_slice_points_equal_split_and_gradient():
    x = randn(2, 6, 3, requires_grad=True)
    pieces = slice_layer("axis: 1 slice_point: 1 slice_point: 4")(x)
    assert [p.shape[1] for p in pieces] == [1, 3, 2]
    assert torch.equal(torch.cat(pieces, 1), x)
    assert [p.shape[2] for p in slice_layer("axis: -1", tops=3)(x)] == [1, 1, 1]
    assert [p.shape[0] for p in slice_layer("slice_dim: 0", tops=2)(x)] == [1, 1]
    assert torch.autograd.gradcheck(lambda t: slice_layer("slice_point: 2 slice_point: 5")(t), (x,))
    single = slice_layer("axis: 1", tops=1)
    assert single(x) is x


@pytest.mark.parametrize("params, tops, match", [
    ("slice_point: 4 slice_point: 2", 3, r"s \(Slice\): slice_param.slice_point must be strictly increasing"),
    ("slice_point: 0 slice_point: 2", 3, r"strictly increasing and > 0, got \[0, 2\]"),
    ("slice_point: 2", 3, r"one value fewer than the tops: got 1 points for 3 tops"),
    ("slice_point: 2 slice_point: 6", 3, r"slice_point 6 leaves nothing for the last top"),
    ("axis: 1", 4, r"size 6 of axis 1 is not divisible by 4 tops"),
    ("axis: 1 slice_dim: 1", 2, r"either axis or slice_dim"),
    ("axis: 3", 2, r"slice_param.axis 3 is out of range for a 3-D bottom"),
])
def test_slice_errors(params, tops, match):
    with pytest.raises(LayerSetupError, match=match):
        slice_layer(params, tops=tops)


def test_concat_axes_and_gradient():
    def concat(params, shapes):
        bottoms = " ".join(f'bottom: "b{i}"' for i in range(len(shapes)))
        return build(f'name: "c" type: "Concat" {bottoms} top: "y" concat_param {{ {params} }}', shapes)
    xs = [randn(2, c, 3, seed=c, requires_grad=True) for c in (1, 4, 2)]
    layer = concat("axis: 1", [x.shape for x in xs])
    assert torch.equal(layer(*xs), torch.cat(xs, 1))
    assert torch.autograd.gradcheck(layer, xs)
    ys = [randn(n, 2, seed=n) for n in (3, 1)]
    assert concat("concat_dim: 0", [y.shape for y in ys])(*ys).shape == (4, 2)
    assert concat("axis: -2", [y.shape for y in ys])(*ys).shape == (4, 2)
    assert concat("axis: 1", [xs[0].shape])(xs[0]) is xs[0]
    with pytest.raises(LayerSetupError, match=r"c \(Concat\): bottoms must match in every dim except "
                                              r"axis 1: bottom 'b1' has shape \(2, 4, 5\)"):
        concat("axis: 1", [(2, 1, 3), (2, 4, 5)])
    with pytest.raises(LayerSetupError, match=r"bottom 'b1' has shape \(2, 4\), bottom 'b0' has \(2, 1, 3\)"):
        concat("axis: 1", [(2, 1, 3), (2, 4)])
    with pytest.raises(LayerSetupError, match=r"either axis or concat_dim"):
        concat("axis: 1 concat_dim: 1", [(2, 1, 3), (2, 4, 3)])
