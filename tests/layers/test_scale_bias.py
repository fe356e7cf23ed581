"""Scale and Bias: num_axes variants, fillers and blobs, a second bottom as the scale."""

import torch


from tests.layers.helpers import build, randn


def test_scale_num_axes_variants():
    shapes = {"num_axes: -1": (3, 4, 5), "num_axes: 0": (), "num_axes: 2 axis: -3": (3, 4),
              "axis: 0 num_axes: 1": (2,)}
    for params, blob_shape in shapes.items():
        layer = build(f'name: "s" type: "Scale" bottom: "x" top: "y" scale_param {{ {params} '
                      f'filler {{ type: "gaussian" }} }}', [(2, 3, 4, 5)]).double()
        assert tuple(layer.scale.shape) == blob_shape, params
        x = randn(2, 3, 4, 5)
        axis = layer.axis
        view = (1,) * axis + blob_shape + (1,) * (4 - axis - len(blob_shape))
        torch.testing.assert_close(layer(x), x * layer.scale.detach().reshape(view))
        torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)


def test_scale_fillers_and_blobs():
    default = build('name: "s" type: "Scale" bottom: "x" top: "y" scale_param { bias_term: true }',
                    [(2, 3)])
    assert default.scale.tolist() == [1., 1., 1.] and default.bias.tolist() == [0., 0., 0.]
    empty_filler = build('name: "s" type: "Scale" bottom: "x" top: "y" scale_param { filler {} '
                         'bias_term: true bias_filler { value: 2 } }', [(2, 3)])
    assert empty_filler.scale.tolist() == [0., 0., 0.] and empty_filler.bias.tolist() == [2., 2., 2.]
    two_bottoms = build('name: "s" type: "Scale" bottom: "x" bottom: "g" top: "y" scale_param { '
                        'bias_term: true }', [(2, 3, 4), (3, 4)])
    assert [tuple(b.shape) for b in two_bottoms.caffe_blobs()] == [(3, 4)]


def test_scale_two_bottoms_gradients():
    layer = build('name: "s" type: "Scale" bottom: "x" bottom: "g" top: "y" scale_param { '
                  'axis: 1 bias_term: true bias_filler { type: "gaussian" } }', [(2, 3, 4), (3,)]).double()
    x, g = randn(2, 3, 4).requires_grad_(True), randn(3, seed=1).requires_grad_(True)
    torch.testing.assert_close(layer(x, g), x * g.reshape(1, 3, 1) + layer.bias.reshape(1, 3, 1))
    torch.autograd.gradcheck(layer, (x, g))
    scalar = build('name: "s" type: "Scale" bottom: "x" bottom: "g" top: "y" scale_param { axis: 2 }',
                   [(2, 3, 4), ()]).double()
    torch.testing.assert_close(scalar(x, torch.tensor(2., dtype=torch.float64)), 2 * x)


def test_bias_layer():
    layer = build('name: "b" type: "Bias" bottom: "x" top: "y" bias_param { axis: 2 num_axes: -1 '
                  'filler { type: "gaussian" } }', [(2, 3, 4, 5)]).double()
    assert tuple(layer.bias.shape) == (4, 5)
    x = randn(2, 3, 4, 5)
    torch.testing.assert_close(layer(x), x + layer.bias.detach())
    torch.autograd.gradcheck(layer, (x.requires_grad_(True),), fast_mode=True)
    default = build('name: "b" type: "Bias" bottom: "x" top: "y"', [(2, 3)])
    assert default.bias.tolist() == [0., 0., 0.]
    from_bottom = build('name: "b" type: "Bias" bottom: "x" bottom: "c" top: "y"', [(2, 3, 4), (3, 4)])
    assert from_bottom.caffe_blobs() == []
    torch.testing.assert_close(from_bottom(torch.zeros(2, 3, 4), torch.ones(3, 4)), torch.ones(2, 3, 4))
