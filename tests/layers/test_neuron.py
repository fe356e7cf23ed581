"""Neuron layers (ReLU, Sigmoid, TanH, AbsVal, BNLL, Threshold, Power, Exp, ELU, Log):
values from the definitions, gradients, the original's special cases."""
import math
import warnings

import numpy as np
import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import build, randn


def layer_of(text, shape=(2, 3, 4, 5), **kw):
    return build(f'name: "l" bottom: "x" top: "y" {text}', [shape], **kw)


@pytest.mark.parametrize("text", [
    'type: "AbsVal"', 'type: "Sigmoid"', 'type: "TanH"', 'type: "BNLL"',
    'type: "ELU" elu_param { alpha: 0.7 }', 'type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.1 }',
    'type: "Exp" exp_param { scale: -1 }', 'type: "Log" log_param { base: 10 scale: 2 shift: 9 }',
    'type: "Power" power_param { power: 3 scale: 0.5 shift: 2 }',
    'type: "Power" power_param { power: 2 scale: -1.5 shift: 0.5 }',
    'type: "Power" power_param { power: 2.5 scale: 1.5 shift: 0 }',
    'type: "Power" power_param { power: 1 scale: -3 shift: 1 }',
])
def test_neuron_gradcheck(text):
    layer = layer_of(text)
    x = randn(2, 3, 4, 5, seed=1)
    if "AbsVal" in text or "ELU" in text or "BNLL" in text:
        x = x + 0.05 * torch.sign(x)          # away from the kink at 0
    if "power: 2.5" in text:
        x = x.abs() + 0.1                      # real powers of positive bases only
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_neuron_values_match_definitions():
    x = randn(3, 7, seed=2).float()
    v = x.double().numpy()
    ref = {
        'type: "Sigmoid"': 1 / (1 + np.exp(-v)),
        'type: "TanH"': np.tanh(v),
        'type: "BNLL"': np.log1p(np.exp(v)),
        'type: "ELU" elu_param { alpha: 0.5 }': np.where(v > 0, v, 0.5 * np.expm1(v)),
        'type: "Threshold" threshold_param { threshold: 0.2 }': (v > 0.2).astype(float),
        'type: "Log" log_param { base: 2 shift: 4 }': np.log2(4 + v),
        'type: "Exp" exp_param { base: 3 scale: 2 shift: 0.5 }': 3.0 ** (0.5 + 2 * v),
    }
    for text, expected in ref.items():
        got = layer_of(text, shape=(3, 7))(x)
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-6, atol=1e-7, err_msg=text)


def test_absval_gradient_at_zero_is_zero():
    x = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    layer_of('type: "AbsVal"', shape=(3,))(x).sum().backward()
    assert x.grad.tolist() == [-1.0, 0.0, 1.0]


def test_bnll_backward_uses_clamped_exponent():
    x = torch.tensor([0.0, 60.0, -3.0, 200.0], requires_grad=True)
    y = layer_of('type: "BNLL"', shape=(4,))(x)
    assert torch.isfinite(y).all() and y[3] == 200.0
    y.backward(torch.ones(4))
    e = np.exp(np.minimum(x.detach().numpy(), 50.0))
    np.testing.assert_allclose(x.grad.numpy(), e / (e + 1), rtol=1e-6)
    assert x.grad[0] == 0.5


def test_threshold_is_forward_only():
    layer = layer_of('type: "Threshold"', shape=(3,))
    assert layer(torch.tensor([-1.0, 0.0, 2.0])).tolist() == [0.0, 0.0, 1.0]
    # the original has no backward: the top keeps no graph (a net refuses a gradient asked
    # through it)
    y = layer(torch.tensor([-1.0, 0.0, 2.0], requires_grad=True))
    assert y.tolist() == [0.0, 0.0, 1.0] and not y.requires_grad
    assert not layer.has_backward()


@pytest.mark.parametrize("params, x, grad", [
    # power*scale == 0: constant pow(shift, power), zero gradient even for a NaN top diff
    ("power: 0 scale: 2 shift: 3", [1.0, -2.0], [0.0, 0.0]),
    ("power: 2 scale: 0 shift: 3", [1.0, -2.0], [0.0, 0.0]),
    # shift == 0: power * y / x, NaN at x = 0 (0/0) like the original
    ("power: 3 scale: 2", [0.0, 2.0], [float("nan"), 3 * 64 / 2]),
    # power == 1: dscale everywhere
    ("power: 1 scale: -2 shift: 5", [0.0, 7.0], [-2.0, -2.0]),
])
def test_power_backward_special_cases(params, x, grad):
    layer = layer_of(f'type: "Power" power_param {{ {params} }}', shape=(2,))
    x = torch.tensor(x, requires_grad=True)
    y = layer(x)
    seed = torch.tensor([float("nan"), 1.0]) if "power: 0" in params or "scale: 0" in params \
        else torch.ones(2)
    y.backward(seed)
    np.testing.assert_array_equal(x.grad.numpy(), np.array(grad, dtype=np.float32))


def test_power_follows_c_pow():
    layer = layer_of('type: "Power" power_param { power: 0.5 }', shape=(2,))
    assert torch.isnan(layer(torch.tensor([-4.0, 4.0])))[0]
    inverse = layer_of('type: "Power" power_param { power: -1 }', shape=(1,))
    assert inverse(torch.tensor([0.0])).item() == math.inf
    constant = layer_of('type: "Power" power_param { power: 2 scale: 0 shift: 3 }', shape=(2,))
    assert constant(torch.tensor([5.0, -1.0])).tolist() == [9.0, 9.0]


def test_exp_base_e_with_shift_keeps_the_sign_bug_and_warns():
    with pytest.warns(UserWarning, match=r"l \(Exp\): .*pow\(-1, shift\)"):
        layer = layer_of('type: "Exp" exp_param { shift: 1 }', shape=(3,))
    x = torch.tensor([0.0, 1.0, -1.0])
    np.testing.assert_allclose(layer(x).numpy(), -np.exp(x.numpy()), rtol=1e-6)
    with pytest.warns(UserWarning):
        fractional = layer_of('type: "Exp" exp_param { shift: 0.5 }', shape=(3,))
    assert torch.isnan(fractional(x)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer_of('type: "Exp" exp_param { scale: -1 }', shape=(3,))   # no shift: no warning


@pytest.mark.parametrize("text, match", [
    ('type: "Exp" exp_param { base: -2 }', r"l \(Exp\): exp_param.base must be strictly positive"),
    ('type: "Log" log_param { base: 0 }', r"l \(Log\): log_param.base must be strictly positive"),
    ('type: "Log" log_param { base: 1 }', r"l \(Log\): .*log\(base\) = 0"),
])
def test_neuron_bad_base(text, match):
    with pytest.raises(LayerSetupError, match=match):
        layer_of(text)
