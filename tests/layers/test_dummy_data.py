"""DummyData: legacy shapes, one filler for all tops, random refills and the fork's xy filler."""

import torch


from tests.layers.helpers import build


def test_dummy_data_legacy_shapes_and_one_filler_for_all():
    layer = build('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { num: 2 '
                  'channels: 3 channels: 1 height: 4 width: 5 width: 6 data_filler { value: 7 } }', [])
    a, b = layer()
    assert a.shape == (2, 3, 4, 5) and b.shape == (2, 1, 4, 6)
    assert (a == 7).all() and (b == 7).all()
    a.add_(1)
    assert (layer()[0] == 7).all()      # every forward returns fresh tensors
    assert layer.output_shapes([]) == [(2, 3, 4, 5), (2, 1, 4, 6)]


def test_dummy_data_random_refills_and_xy():
    layer = build('name: "d" type: "DummyData" top: "r" top: "xy" dummy_data_param { '
                  'shape { dim: 3 dim: 4 } shape { dim: 2 dim: 2 dim: 3 dim: 4 } '
                  'data_filler { type: "gaussian" } data_filler { type: "xy" } }', [])
    first, xy = layer()
    second, _ = layer()
    assert first.shape == (3, 4) and not torch.equal(first, second)
    columns = torch.arange(4.).expand(3, 4)
    rows = torch.arange(3.)[:, None].expand(3, 4)
    for image in range(2):           # every image gets (x, y) (the original: only image 0)
        assert torch.equal(xy[image, 0], columns) and torch.equal(xy[image, 1], rows)
    default = build('name: "d" type: "DummyData" top: "z" dummy_data_param { shape { dim: 2 } }', [])
    assert default().tolist() == [0., 0.]
