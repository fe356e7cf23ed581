"""InnerProduct: axis and transpose."""

import torch


from tests.layers.helpers import build, randn


def test_inner_product_axis_and_transpose():
    plain = build('name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { '
                  'num_output: 5 axis: 2 weight_filler { type: "gaussian" } bias_filler { '
                  'type: "constant" value: 0.5 } }', [(2, 3, 4, 6)]).double()
    assert plain.weight.shape == (5, 24)
    x = randn(2, 3, 4, 6)
    ref = x.reshape(6, 24) @ plain.weight.detach().t() + 0.5
    torch.testing.assert_close(plain(x), ref.reshape(2, 3, 5))
    transposed = build('name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { '
                       'num_output: 5 axis: -3 transpose: true }', [(2, 3, 4, 6)])
    assert transposed.weight.shape == (72, 5)
    with torch.no_grad():
        transposed.weight.copy_(randn(72, 5, dtype=torch.float32))
    ref = x.float().reshape(2, 72) @ transposed.weight.detach()
    torch.testing.assert_close(transposed(x.float()), ref)
