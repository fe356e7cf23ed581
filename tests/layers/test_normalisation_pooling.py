"""MVN, SPP, STOCHASTIC pooling, Embed, Filter, BatchReindex and SpatialProduct beyond the golden
cases: float64 references written from the definitions with loops, at other parameters and
shapes, gradients (gradcheck where the original's backward is the exact derivative, its own formula
where not), refused index/selector bottoms and the build-time errors."""
import itertools
import math

import numpy as np
import pytest
import torch

from segaware_caffe import LayerSetupError
from tests.kernels.layer_helpers import build_layer


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------- MVN
def mvn_reference(x, normalize_variance, across_channels, eps):
    """(y, the original's backward as a function of dy), with loops over the statistics' groups."""
    shape = tuple(x.shape) + (1,) * (4 - x.dim())
    x = x.numpy().reshape(shape)
    n, c = shape[:2]
    groups = [(i, slice(None)) for i in range(n)] if across_channels else \
        [(i, j) for i in range(n) for j in range(c)]
    y, stds = np.zeros_like(x), []
    for g in groups:
        v = x[g]
        centred = v - v.mean()
        std = math.sqrt((centred ** 2).mean()) + eps
        y[g] = centred / std if normalize_variance else centred
        stds.append(std)

    def backward(dy):
        dy = dy.numpy().reshape(shape)
        dx = np.zeros_like(dy)
        for g, std in zip(groups, stds):
            d, yy = dy[g], y[g]
            if normalize_variance:
                dx[g] = (d - d.mean() - yy * (yy * d).mean()) / std
            else:
                dx[g] = d - d.mean()
        return dx
    return y, backward


@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (2, 4, 3), (4, 3)])
@pytest.mark.parametrize("params", [
    (True, False, 1e-9), (False, False, 1e-9), (True, True, 0.3), (False, True, 1e-9),
    (True, False, 0.5),
])
def test_mvn_matches_definition(shape, params):
    normalize_variance, across_channels, eps = params
    x = randn(*shape, seed=1) * 2 + 0.5
    layer = build_layer(f'name: "m" type: "MVN" bottom: "x" top: "y" mvn_param {{ '
                        f'normalize_variance: {str(normalize_variance).lower()} '
                        f'across_channels: {str(across_channels).lower()} eps: {eps} }}', [shape])
    ref, backward = mvn_reference(x, normalize_variance, across_channels,
                                  float(np.float32(eps)))
    x.requires_grad_()
    y = layer(x)
    assert tuple(y.shape) == tuple(shape) + (1,) * (4 - len(shape))   # the top is always 4-D
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    dy = randn(*y.shape, seed=2)
    y.backward(dy)
    np.testing.assert_allclose(x.grad.numpy().reshape(y.shape), backward(dy), rtol=1e-9, atol=1e-12)


def test_mvn_gradient_is_the_originals_not_the_exact_one():
    """With a large eps the original's backward (y mean(y dy) / (std + eps)) differs from the
    derivative; with eps tiny they agree (gradcheck)."""
    x = randn(2, 3, 4, 4, seed=3)
    exact = build_layer('name: "m" type: "MVN" bottom: "x" top: "y" mvn_param { eps: 1e-12 }',
                        [x.shape])
    assert torch.autograd.gradcheck(exact, (x.clone().requires_grad_(),), atol=1e-6)
    mean_only = build_layer('name: "m" type: "MVN" bottom: "x" top: "y" mvn_param { '
                            'normalize_variance: false across_channels: true }', [x.shape])
    assert torch.autograd.gradcheck(mean_only, (x.clone().requires_grad_(),))
    loose = build_layer('name: "m" type: "MVN" bottom: "x" top: "y" mvn_param { eps: 0.5 }',
                        [x.shape])
    assert not torch.autograd.gradcheck(loose, (x.clone().requires_grad_(),), raise_exception=False)


def test_mvn_errors():
    with pytest.raises(LayerSetupError, match=r"m \(MVN\): the bottom must have at most 4 axes"):
        build_layer('name: "m" type: "MVN" bottom: "x" top: "y"', [(1, 2, 3, 4, 5)])


# ----------------------------------------------------------------------------------------- SPP
def caffe_pool_reference(x, method, kernel, pad, stride):
    """Caffe's Pooling (ceil rule, last window inside the image when padding, AVE divisor
    counting padding up to size + pad), with loops."""
    x = x.numpy()
    n, c, h, w = x.shape
    out = []
    for size, k, p, s in zip((h, w), kernel, pad, stride):
        o = int(math.ceil((size + 2 * p - k) / s)) + 1
        if any(pad) and (o - 1) * s >= size + p:
            o -= 1
        out.append(o)
    y = np.zeros((n, c, *out))
    for i, j, oh, ow in itertools.product(range(n), range(c), range(out[0]), range(out[1])):
        hs, ws = oh * stride[0] - pad[0], ow * stride[1] - pad[1]
        he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
        window = x[i, j, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
        y[i, j, oh, ow] = window.max() if method == "MAX" else window.sum() / ((he - hs) * (we - ws))
    return y


def spp_reference(x, height, method):
    h, w = x.shape[2:]
    levels = []
    for level in range(height):
        bins = 2 ** level
        kernel = (math.ceil(h / bins), math.ceil(w / bins))
        pad = ((kernel[0] * bins - h + 1) // 2, (kernel[1] * bins - w + 1) // 2)
        levels.append(caffe_pool_reference(x, method, kernel, pad, kernel))
    if height == 1:
        return levels[0]
    return np.concatenate([v.reshape(len(v), -1) for v in levels], axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("height, shape", [(1, (2, 3, 5, 4)), (2, (1, 2, 7, 10)),
                                           (3, (2, 2, 13, 9)), (4, (1, 1, 29, 30))])
def test_spp_matches_pooling_rules(method, height, shape):
    x = randn(*shape, seed=4)
    layer = build_layer(f'name: "s" type: "SPP" bottom: "x" top: "y" spp_param {{ '
                        f'pyramid_height: {height} pool: {method} }}', [shape])
    ref = spp_reference(x, height, method)
    y = layer(x)
    assert tuple(y.shape) == ref.shape == tuple(layer.output_shapes([shape])[0])
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-12)
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(),))


def test_spp_follows_the_input_size_at_each_forward():
    layer = build_layer('name: "s" type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 2 '
                        'pool: AVE }', [(1, 1, 8, 8)])
    x = randn(1, 2, 11, 6, seed=5)
    np.testing.assert_allclose(layer(x).numpy(), spp_reference(x, 2, "AVE"), rtol=1e-12)


@pytest.mark.parametrize("text, shape, message", [
    ('spp_param { pool: MAX }', (1, 1, 4, 4), r"spp_param.pyramid_height must be given and >= 1"),
    ('spp_param { pyramid_height: 3 }', (1, 1, 3, 8),
     r"level 2 \(4 bins\) on a 3x8 input needs pad \(1, 0\) with kernel \(1, 2\); Pooling requires "
     r"pad < kernel"),
    ('spp_param { pyramid_height: 2 pool: STOCHASTIC }', (1, 1, 5, 4),
     r"level 1 \(2 bins\) on a 5x4 input needs pad \(1, 0\), and STOCHASTIC pooling takes no "
     r"padding"),
    ('spp_param { pyramid_height: 2 }', (2, 3, 4), r"the bottom must have 4 axes"),
])
def test_spp_errors(text, shape, message):
    with pytest.raises(LayerSetupError, match=r"s \(SPP\): " + message):
        build_layer(f'name: "s" type: "SPP" bottom: "x" top: "y" {text}', [shape])


# ------------------------------------------------------------------------- STOCHASTIC pooling
def stochastic_reference(x, kernel, stride, u=None):
    """Loops over the original's GPU kernels: TEST sum(x^2) / (FLT_MIN + sum(x)); TRAIN the first
    element whose running sum reaches u * sum (returns values and chosen flat indices)."""
    x = x.numpy()
    n, c, h, w = x.shape
    out = [int(math.ceil((size - k) / s)) + 1 for size, k, s in zip((h, w), kernel, stride)]
    y, chosen = np.zeros((n, c, *out)), np.full((n, c, *out), -1)
    for i, j, oh, ow in itertools.product(range(n), range(c), range(out[0]), range(out[1])):
        hs, ws = oh * stride[0], ow * stride[1]
        cells = [(a, b) for a in range(hs, min(hs + kernel[0], h))
                 for b in range(ws, min(ws + kernel[1], w))]
        if u is None:
            total = np.float32(1.1754944e-38) + sum(x[i, j, a, b] for a, b in cells)
            y[i, j, oh, ow] = sum(x[i, j, a, b] ** 2 for a, b in cells) / total
            continue
        total = sum(x[i, j, a, b] for a, b in cells)
        threshold = u[i * c + j, 0, oh * out[1] + ow] * total
        running = 0.0
        for a, b in cells:
            running += x[i, j, a, b]
            if running >= threshold:
                y[i, j, oh, ow], chosen[i, j, oh, ow] = x[i, j, a, b], a * w + b
                break
    return y, chosen


STOCHASTIC = ('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ pool: STOCHASTIC '
              'kernel_h: {0} kernel_w: {1} stride_h: {2} stride_w: {3} }}')


@pytest.mark.parametrize("geometry", [(3, 3, 2, 2), (2, 3, 1, 2), (1, 1, 3, 3)])
def test_stochastic_pooling_test_phase(geometry):
    x = torch.rand(2, 3, 7, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x[0, 0] = 0                                         # all-zero windows give 0
    layer = build_layer(STOCHASTIC.format(*geometry), [x.shape], phase="TEST")
    ref, _ = stochastic_reference(x, geometry[:2], geometry[2:])
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-12)
    # the original's TEST-phase backward reads indices only a TRAIN forward writes: none here
    assert not layer.has_backward() and not layer(x.clone().requires_grad_()).requires_grad


@pytest.mark.parametrize("geometry", [(3, 3, 2, 2), (2, 3, 1, 2), (1, 1, 3, 3)])
def test_stochastic_pooling_train_phase_draws_like_the_gpu_kernel(geometry):
    """(1, 1, 3, 3) on 7x8 leaves the last windows empty (ceil rule without padding): 0."""
    x = torch.rand(2, 3, 7, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    layer = build_layer(STOCHASTIC.format(*geometry), [x.shape], phase="TRAIN")
    out_hw = layer.output_spatial_size(7, 8)
    torch.manual_seed(11)
    u = 1 - torch.rand((6, 1, out_hw[0] * out_hw[1]), dtype=torch.float64)   # the layer's draw
    torch.manual_seed(11)
    x.requires_grad_()
    y = layer(x)
    ref, chosen = stochastic_reference(x.detach(), geometry[:2], geometry[2:], u.numpy())
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=0, atol=0)
    dy = torch.rand(y.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y.backward(dy)
    expected = np.zeros((2, 3, 7 * 8))
    for i, j, oh, ow in itertools.product(range(2), range(3), *map(range, out_hw)):
        if chosen[i, j, oh, ow] >= 0:      # the gradient goes to the drawn element, accumulating
            expected[i, j, chosen[i, j, oh, ow]] += dy[i, j, oh, ow].item()
    np.testing.assert_allclose(x.grad.numpy().reshape(2, 3, -1), expected, rtol=1e-12)


def test_stochastic_pooling_draws_in_proportion_to_the_values():
    layer = build_layer(STOCHASTIC.format(2, 2, 2, 2), [(1, 1, 2, 2)], phase="TRAIN")
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    torch.manual_seed(0)
    draws = torch.stack([layer(x).reshape(()) for _ in range(4000)])
    freq = [(draws == v).double().mean().item() for v in (1, 2, 3, 4)]
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)


def test_stochastic_pooling_never_reaching_the_threshold_gives_zero():
    layer = build_layer(STOCHASTIC.format(2, 2, 2, 2), [(1, 1, 2, 2)], phase="TRAIN")
    # sum -1: the threshold -u lies above every running sum (-1, -2, -3, -1) unless u is 1
    x = torch.tensor([-1.0, -1.0, -1.0, 2.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    x.requires_grad_()
    y = layer(x)
    assert y.item() == 0
    y.sum().backward()
    assert (x.grad == 0).all()


# --------------------------------------------------------------------------------------- Embed
@pytest.mark.parametrize("bias_term", [True, False])
def test_embed_rows_truncated_indices_and_accumulated_gradients(bias_term):
    layer = build_layer(f'name: "e" type: "Embed" bottom: "i" top: "y" embed_param {{ num_output: 3 '
                        f'input_dim: 5 bias_term: {str(bias_term).lower()} '
                        f'weight_filler {{ type: "gaussian" std: 1 }} '
                        f'bias_filler {{ type: "constant" value: 0.25 }} }}', [(2, 4)])
    assert tuple(layer.weight.shape) == (5, 3)
    assert [tuple(p.shape) for p in layer.caffe_blobs()] == [(5, 3)] + ([(3,)] if bias_term else [])
    idx = torch.tensor([[4.0, 1.7, 0.0, 1.0], [2.2, 1.0, 4.0, 3.0]])
    y = layer(idx)
    w, b = layer.weight.detach().numpy(), 0.25 if bias_term else 0.0
    ref = np.array([[w[int(v)] + b for v in row] for row in idx.numpy()])
    assert tuple(y.shape) == (2, 4, 3) == tuple(layer.output_shapes([(2, 4)])[0])
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-6)
    dy = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3)
    y.backward(dy)
    grad_w = np.zeros((5, 3))
    for (r, c) in itertools.product(range(2), range(4)):
        grad_w[int(idx[r, c])] += dy[r, c].numpy()      # row 1 is picked three times
    np.testing.assert_allclose(layer.weight.grad.numpy(), grad_w)
    if bias_term:
        np.testing.assert_allclose(layer.bias.grad.numpy(), dy.sum((0, 1)).numpy())


def test_embed_index_errors_and_refused_gradient():
    layer = build_layer('name: "e" type: "Embed" bottom: "i" top: "y" embed_param { num_output: 2 '
                        'input_dim: 3 }', [(4,)])
    with pytest.raises(ValueError, match=r"e \(Embed\): index 3 is outside \[0, 3\)"):
        layer(torch.tensor([0.0, 1.0, 3.0, 2.0]))
    assert layer.refuses_gradient(0, 1)     # the net refuses a gradient asked of the indices
    with pytest.raises(LayerSetupError, match=r"e \(Embed\): embed_param.input_dim must be > 0"):
        build_layer('name: "e" type: "Embed" bottom: "i" top: "y" embed_param { num_output: 2 }',
                    [(4,)])


# -------------------------------------------------------------------------------------- Filter
def test_filter_keeps_nonzero_items_in_order_and_scatters_gradients():
    x, z = randn(5, 2, 3, seed=9).requires_grad_(), randn(5, 4, seed=10).requires_grad_()
    selector = torch.tensor([0.5, 0.0, -2.0, 0.0, float("nan")], dtype=torch.float64).reshape(5, 1, 1)
    layer = build_layer('name: "f" type: "Filter" bottom: "x" bottom: "z" bottom: "s" top: "fx" '
                        'top: "fz"', [x.shape, z.shape, selector.shape])
    # the build-time shapes are the original's setup shapes (every item)
    assert layer.output_shapes([x.shape, z.shape, selector.shape]) == [(5, 2, 3), (5, 4)]
    fx, fz = layer(x, z, selector)
    keep = [0, 2, 4]
    np.testing.assert_array_equal(fx.detach().numpy(), x.detach().numpy()[keep])
    np.testing.assert_array_equal(fz.detach().numpy(), z.detach().numpy()[keep])
    (fx.sum() * 2 + (fz * fz).sum()).backward()
    expected_x = np.zeros((5, 2, 3))
    expected_x[keep] = 2
    expected_z = np.zeros((5, 4))
    expected_z[keep] = 2 * z.detach().numpy()[keep]
    np.testing.assert_array_equal(x.grad.numpy(), expected_x)
    np.testing.assert_allclose(z.grad.numpy(), expected_z)
    single = build_layer('name: "f" type: "Filter" bottom: "x" bottom: "s" top: "fx"',
                         [x.shape, (5,)])
    assert tuple(single(x, torch.zeros(5, dtype=torch.float64)).shape) == (0, 2, 3)


@pytest.mark.parametrize("tops, shapes, message", [
    (2, [(3, 2), (3, 1)], r"needs one top per filtered bottom \(1, the last bottom being the selector\)"),
    (1, [(3, 2), (3, 2)], r"the selector \(last bottom\) must have shape \(N, 1, \.\.\.\)"),
    (1, [(4, 2), (3, 1)], r"bottom 0 \(4, 2\) must have as many items as the selector \(3, 1\)"),
])
def test_filter_errors(tops, shapes, message):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(len(shapes)))
    top_text = " ".join(f'top: "t{i}"' for i in range(tops))
    with pytest.raises(LayerSetupError, match=r"f \(Filter\): " + message):
        build_layer(f'name: "f" type: "Filter" {bottoms} {top_text}', shapes)


# -------------------------------------------------------------------------------- BatchReindex
def test_batch_reindex_gathers_and_accumulates():
    x = randn(4, 3, 2, seed=11).requires_grad_()
    idx = torch.tensor([3.0, 0.0, 3.7, 1.0, 3.0], dtype=torch.float64)      # 3.7 -> 3; item 2 unused
    layer = build_layer('name: "r" type: "BatchReindex" bottom: "x" bottom: "i" top: "y"',
                        [x.shape, idx.shape])
    y = layer(x, idx)
    assert tuple(y.shape) == (5, 3, 2) == tuple(layer.output_shapes([x.shape, idx.shape])[0])
    np.testing.assert_array_equal(y.detach().numpy(), x.detach().numpy()[[3, 0, 3, 1, 3]])
    dy = randn(5, 3, 2, seed=12)
    y.backward(dy)
    expected = np.zeros((4, 3, 2))
    for i, j in enumerate([3, 0, 3, 1, 3]):
        expected[j] += dy[i].numpy()
    np.testing.assert_allclose(x.grad.numpy(), expected)
    assert (x.grad[2] == 0).all()


def test_batch_reindex_errors():
    layer = build_layer('name: "r" type: "BatchReindex" bottom: "x" bottom: "i" top: "y"',
                        [(4, 2), (2,)])
    with pytest.raises(ValueError, match=r"r \(BatchReindex\): index -0.5 is outside \[0, 4\)"):
        layer(torch.zeros(4, 2), torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match=r"index 4 is outside \[0, 4\)"):
        layer(torch.zeros(4, 2), torch.tensor([1.0, 4.0]))
    with pytest.raises(LayerSetupError, match=r"r \(BatchReindex\): the index bottom must have 1 "
                                              r"axis \(M,\), got shape \(2, 1\)"):
        build_layer('name: "r" type: "BatchReindex" bottom: "x" bottom: "i" top: "y"',
                    [(4, 2), (2, 1)])


# ------------------------------------------------------------------------------ SpatialProduct
@pytest.mark.parametrize("x_shape, m_shape", [((2, 3, 4, 5), (2, 1, 4, 5)), ((3, 2, 7), (3, 1, 7)),
                                              ((2, 5), (2, 1))])
def test_spatial_product_values_and_gradients(x_shape, m_shape):
    x, m = randn(*x_shape, seed=13), randn(*m_shape, seed=14)
    layer = build_layer('name: "p" type: "SpatialProduct" bottom: "x" bottom: "m" top: "y"',
                        [x_shape, m_shape])
    y = layer(x, m).numpy()
    for index in np.ndindex(x_shape):
        assert y[index] == x.numpy()[index] * m.numpy()[(index[0], 0) + index[2:]]
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(), m.requires_grad_()))


def test_spatial_product_errors():
    with pytest.raises(LayerSetupError, match=r"p \(SpatialProduct\): the map bottom must have shape "
                                              r"\(2, 1, 4, 5\)"):
        build_layer('name: "p" type: "SpatialProduct" bottom: "x" bottom: "m" top: "y"',
                    [(2, 3, 4, 5), (2, 2, 4, 5)])
