"""Softmax and SoftmaxWithLoss: axes, normalisations (also on a non-channel axis), ignore_label,
the FLT_MIN clamp, the second top, errors."""
import itertools
import math

import numpy as np
import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import build, randn, softmax_loss
from tests.tolerances import assert_close


@pytest.mark.parametrize("axis", [1, 0, -1, 2])
def test_softmax_axis_and_gradcheck(axis):
    layer = build(f'name: "s" type: "Softmax" bottom: "x" top: "y" softmax_param {{ axis: {axis} }}', [(2, 3, 4)])
    x = randn(2, 3, 4, requires_grad=True)
    assert torch.allclose(layer(x).sum(axis), torch.ones(()).double())
    assert torch.autograd.gradcheck(layer, (x,))


def softmax_loss_reference(scores, labels, ignore, normalizer):
    prob = torch.softmax(scores.double(), 1)
    total = 0.0
    for n, h, w in np.ndindex(labels.shape[0], labels.shape[2], labels.shape[3]):
        label = int(labels[n, 0, h, w])
        if label != ignore:
            total -= math.log(max(prob[n, label, h, w].item(), np.finfo(np.float32).tiny))
    return total / normalizer


@pytest.mark.parametrize("loss_param, normalizer", [
    ("ignore_label: 255", 3), ("ignore_label: 255 normalization: VALID", 3),
    ("ignore_label: 255 normalization: FULL", 4), ("ignore_label: 255 normalization: BATCH_SIZE", 2),
    ("ignore_label: 255 normalization: NONE", 1), ("ignore_label: 255 normalize: false", 2),
    ("ignore_label: 255 normalize: true", 3), ("ignore_label: 255 normalize: false normalization: FULL", 4),
    ("", 4),
])
def test_softmax_loss_normalizations(loss_param, normalizer):
    # measured on the original: 3 valid of 4 positions, N = 2
    scores = randn(2, 3, 1, 2, seed=3).float().requires_grad_(True)
    labels = torch.tensor([[[[0.0, 2.7]]], [[[255.0, 1.0]]]])    # 2.7 truncates to 2
    if not loss_param:
        labels[1, 0, 0, 0] = 1.0
    layer = softmax_loss(loss_param)
    loss = layer(scores, labels)
    assert loss.shape == ()
    ignore = 255 if loss_param else None
    assert loss.item() == pytest.approx(softmax_loss_reference(scores.detach(), labels, ignore, normalizer), rel=1e-6)
    (loss * 2.5).backward()                                     # loss weight 2.5 as the top grad
    onehot = torch.zeros(2, 3, 1, 2)
    for n, w in np.ndindex(2, 2):
        label = int(labels[n, 0, 0, w])
        if label != ignore:
            onehot[n, label, 0, w] = 1
    valid = (labels != ignore).float() if ignore is not None else torch.ones_like(labels)
    expected = (torch.softmax(scores.detach(), 1) - onehot) * valid * 2.5 / normalizer
    torch.testing.assert_close(scores.grad, expected)


@pytest.mark.parametrize("loss_param,mode", [
    ("normalization: FULL", "FULL"), ("normalization: VALID", "VALID"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"), ("normalization: NONE", "NONE"),
    ("normalize: false", "BATCH_SIZE"), ("normalize: false normalization: FULL", "FULL"), ("", "VALID"),
])
@pytest.mark.parametrize("shape,axis,label_shape", [((2, 4, 3, 5), 1, (2, 1, 3, 5)),
                                                    ((2, 3, 4, 5), -2, (2, 3, 1, 5))])
def test_softmax_loss_normalisation_on_any_axis(loss_param, mode, shape, axis, label_shape):
    rng = np.random.default_rng(5)
    ax = axis % len(shape)
    channels, outer, inner = shape[ax], math.prod(shape[:ax]), math.prod(shape[ax + 1:])
    x = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, channels, label_shape).astype(np.float32)
    labels.reshape(-1)[::3] = 255
    layer = build(f'name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l" '
                  f'softmax_param {{ axis: {axis} }} loss_param {{ {loss_param} ignore_label: 255 }}',
                  [shape, label_shape])
    scores = x.reshape(outer, channels, inner).astype(np.float64)
    prob = np.exp(scores - scores.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    label = labels.reshape(outer, inner).astype(int)
    valid = label != 255
    loss, grad = 0.0, prob.copy()
    for o, i in itertools.product(range(outer), range(inner)):
        if valid[o, i]:
            loss -= np.log(prob[o, label[o, i], i])
            grad[o, label[o, i], i] -= 1
        else:
            grad[o, :, i] = 0
    normalizer = max(1, {"FULL": outer * inner, "VALID": valid.sum(), "BATCH_SIZE": outer,
                         "NONE": 1}[mode])
    xt = torch.tensor(x, requires_grad=True)
    out = layer(xt, torch.tensor(labels))
    (2 * out).backward()
    assert_close(out, loss / normalizer, "loss")
    assert_close(xt.grad, (2 * grad / normalizer).reshape(shape), "scores diff")


def test_softmax_loss_gradcheck_and_second_top():
    layer = softmax_loss("ignore_label: 1", shape=(2, 4, 3, 2), tops=2)
    scores = randn(2, 4, 3, 2, requires_grad=True)
    labels = torch.randint(0, 4, (2, 1, 3, 2), generator=torch.Generator().manual_seed(0)).double()
    loss, prob = layer(scores, labels)
    torch.testing.assert_close(prob, torch.softmax(scores, 1))
    assert not prob.requires_grad                # the original ignores the prob top's diff
    assert torch.autograd.gradcheck(lambda s: layer(s, labels)[0], (scores,))
    axis3 = build('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" '
                  'softmax_param { axis: 2 }', [(2, 3, 4), (2, 3)])
    x = randn(2, 3, 4)
    assert axis3(x, torch.zeros(2, 3)).item() == pytest.approx(-torch.log_softmax(x, 2)[..., 0].mean().item())


def test_softmax_loss_clamps_probability_at_flt_min_but_keeps_gradient():
    layer = softmax_loss("", shape=(1, 2, 1, 1))
    scores = torch.tensor([[[[0.0]], [[200.0]]]], requires_grad=True)
    loss = layer(scores, torch.zeros(1, 1, 1, 1))
    assert loss.item() == pytest.approx(-math.log(np.finfo(np.float32).tiny), rel=1e-6)
    loss.backward()
    assert scores.grad.flatten().tolist() == [-1.0, 1.0]


def test_softmax_loss_errors():
    with pytest.raises(LayerSetupError, match=r"loss \(SoftmaxWithLoss\): labels \(2, 1, 5\) must have one "
                                              r"entry per prediction: 4 for scores \(2, 3, 2\)"):
        build('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss"', [(2, 3, 2), (2, 1, 5)])
    with pytest.raises(LayerSetupError, match=r"give loss_weight once per top, got 0 loss_weight values for 2 tops"):
        build('name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" top: "p"',
              [(2, 3), (2,)])
    layer = softmax_loss("ignore_label: 255")
    with pytest.raises(ValueError, match=r"loss \(SoftmaxWithLoss\): label 3 is outside \[0, 3\)"):
        layer(torch.zeros(2, 3, 1, 2), torch.tensor([[[[0.0, 3.0]]], [[[255.0, 1.0]]]]))
    assert layer.output_shapes([(2, 3, 1, 2), (2, 1, 1, 2)]) == [()]
