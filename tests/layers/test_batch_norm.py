"""BatchNorm (the fork's): global-stats default by phase, the unloaded-layer quirk, batch
mode with its persistent divisor, statistics updates in TRAIN."""
import math

import pytest
import torch


from tests.layers.helpers import build, randn


BN = 'name: "bn" type: "BatchNorm" bottom: "x" top: "y"'


def test_batch_norm_use_global_stats_default_follows_phase():
    assert build(BN, [(2, 3, 4, 4)], phase="TEST").use_global_stats
    assert not build(BN, [(2, 3, 4, 4)], phase="TRAIN").use_global_stats
    forced = build(BN + ' batch_norm_param { use_global_stats: true }', [(2, 3, 4, 4)], phase="TRAIN")
    assert forced.use_global_stats
    assert [tuple(b.shape) for b in forced.caffe_blobs()] == [(3,), (3,), (1,)]
    assert not any(b.any() for b in forced.caffe_blobs())


def test_batch_norm_unloaded_layer_scales_by_one_over_sqrt_eps():
    layer = build(BN, [(1, 2, 3, 3)])
    x = randn(1, 2, 3, 3, dtype=torch.float32)
    torch.testing.assert_close(layer(x), x / math.sqrt(1e-5))
    assert layer(x)[0, 0, 0, 0].item() == pytest.approx(x[0, 0, 0, 0].item() * 316.2278, rel=1e-5)


def test_batch_norm_global_stats_forward_and_backward():
    layer = build(BN + ' batch_norm_param { eps: 0.01 }', [(2, 3, 4, 5)])
    mean, var, factor = torch.tensor([1., -2., 0.5]), torch.tensor([4., 0.25, 1.]), 2.5
    with torch.no_grad():
        layer.mean_sum.copy_(mean * factor)
        layer.variance_sum.copy_(var * factor)
        layer.scale_factor.fill_(factor)
    x = randn(2, 3, 4, 5, dtype=torch.float32).requires_grad_(True)
    std = torch.sqrt(var + 0.01).reshape(1, 3, 1, 1)
    y = layer(x)
    torch.testing.assert_close(y, (x - mean.reshape(1, 3, 1, 1)) / std)
    probe = randn(2, 3, 4, 5, seed=1, dtype=torch.float32)
    grads = torch.autograd.grad((y * probe).sum(), [x, *layer.caffe_blobs()], allow_unused=True)
    torch.testing.assert_close(grads[0], probe / std)
    assert all(g is None for g in grads[1:])


def test_batch_norm_batch_mode_persistent_divisor_quirk():
    layer = build(BN, [(2, 2, 3, 3)], phase="TRAIN")
    x = randn(2, 2, 3, 3, dtype=torch.float32).requires_grad_(True)
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    expected = 0.0
    for _ in range(4):           # 0.00316, 0.0563, 0.237, 0.487 (the original's numbers)
        expected = math.sqrt(expected + 1e-5)
        y = layer(x)
        divisor = (centred / y).detach()
        assert divisor.min().item() == pytest.approx(expected, rel=1e-4)
        assert divisor.max().item() == pytest.approx(expected, rel=1e-4)
    assert expected == pytest.approx(0.487, abs=5e-4)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 1 / expected), rtol=1e-4, atol=0)
    assert not any(b.any() for b in layer.caffe_blobs())   # accumulators untouched


def test_batch_norm_update_global_stats_in_train():
    layer = build(BN + ' batch_norm_param { use_global_stats: true update_global_stats: true '
                  'moving_average_fraction: 0.5 }', [(2, 2, 3, 3)], phase="TRAIN")
    with torch.no_grad():
        layer.mean_sum.copy_(torch.tensor([2., 4.]))
        layer.variance_sum.copy_(torch.tensor([6., 8.]))
        layer.scale_factor.fill_(2.)
    x = randn(2, 2, 3, 3)
    layer.double()
    y = layer(x)
    mean = torch.tensor([1., 2.], dtype=torch.float64)
    var = ((x - mean.reshape(1, 2, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(y, (x - mean.reshape(1, 2, 1, 1)) / torch.sqrt(var + 1e-5).reshape(1, 2, 1, 1))
    torch.testing.assert_close(layer.scale_factor.detach(), torch.tensor([2.], dtype=torch.float64))
    torch.testing.assert_close(layer.mean_sum.detach(), mean + 0.5 * torch.tensor([2., 4.], dtype=torch.float64))
    torch.testing.assert_close(layer.variance_sum.detach(),
                               18 / 17 * var + 0.5 * torch.tensor([6., 8.], dtype=torch.float64))
    # TEST phase ignores update_global_stats
    frozen = build(BN + ' batch_norm_param { update_global_stats: true }', [(2, 2, 3, 3)])
    frozen(randn(2, 2, 3, 3, dtype=torch.float32))
    assert not frozen.scale_factor.any()
