"""Standard layers whose golden cases cover one setting each, at the other settings: Accuracy
(top_k, ignore_label, axis), Log (base, scale, shift), Reduction (axis, coeff, every operation),
PReLU (channel_shared), Bias (axis, num_axes, two bottoms), ELU, BNLL; and which layers have no
backward or refuse some bottoms, as the fork's Backward functions do."""
import math

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.errors import NoBackwardError
from segaware_caffe.layer import layer_class
from tests.kernels.layer_helpers import build_layer


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------ Accuracy
def accuracy_reference(scores, labels, axis, top_k, ignore):
    """Loops: an item counts as correct when its label is among the top_k of (value, class)
    pairs sorted descending (std::partial_sort with greater<pair>)."""
    s = np.moveaxis(scores.numpy(), axis, -1).reshape(-1, scores.shape[axis])
    labels = labels.numpy().ravel()
    correct = count = 0
    per_total, per_correct = np.zeros(s.shape[1]), np.zeros(s.shape[1])
    for row, label in zip(s, labels):
        label = int(label)
        if ignore is not None and label == ignore:
            continue
        ranked = sorted(((v, k) for k, v in enumerate(row)), reverse=True)[:top_k]
        hit = any(k == label for _, k in ranked)
        correct += hit
        count += 1
        per_total[label] += 1
        per_correct[label] += hit
    per_class = np.where(per_total > 0, per_correct / np.maximum(per_total, 1), 0)
    return correct / count, per_class


@pytest.mark.parametrize("axis, top_k, ignore", [(1, 3, None), (2, 2, 3), (-1, 1, 0), (1, 4, 2)])
def test_accuracy_axis_top_k_ignore_label(axis, top_k, ignore):
    scores = torch.round(randn(3, 5, 4, seed=1) * 2) / 2       # coarse values: ties happen
    classes = scores.shape[axis]
    label_shape = [s for i, s in enumerate(scores.shape) if i != axis % 3]
    labels = torch.randint(0, classes, label_shape, generator=torch.Generator().manual_seed(2))
    labels = labels.double()
    ignore_text = f" ignore_label: {ignore}" if ignore is not None else ""
    layer = build_layer(f'name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" '
                        f'top: "per" accuracy_param {{ axis: {axis} top_k: {top_k}{ignore_text} }}',
                        [scores.shape, labels.shape])
    acc, per_class = layer(scores, labels)
    ref_acc, ref_per = accuracy_reference(scores, labels, axis % 3, top_k, ignore)
    assert acc.item() == pytest.approx(ref_acc, abs=1e-12)
    np.testing.assert_allclose(per_class.numpy(), ref_per, atol=1e-12)
    assert tuple(per_class.shape) == (classes,)


# ----------------------------------------------------------------------------------------- Log
@pytest.mark.parametrize("params", ["", "log_param { base: 10 scale: -0.5 shift: 3 }",
                                    "log_param { base: 0.5 shift: 1.25 }", "log_param { scale: 2 }"])
def test_log_base_scale_shift(params):
    x = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    layer = build_layer(f'name: "g" type: "Log" bottom: "x" top: "y" {params}', [x.shape])
    p = {"base": -1.0, "scale": 1.0, "shift": 0.0}
    for key, value in zip(params.split()[2::2], params.split()[3::2]):
        p[key.rstrip(":")] = float(value)
    base, scale, shift = (float(np.float32(p[k])) for k in ("base", "scale", "shift"))
    log_base = 1.0 if base == -1 else math.log(base)
    ref = np.vectorize(lambda v: math.log(shift + scale * v) / log_base)(x.numpy())
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-6)    # 1/ln(base) is float32
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(),))


# ----------------------------------------------------------------------------------- Reduction
@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis, coeff", [(0, 1.0), (-1, -1.5), (2, 0.25), (1, 3.0)])
def test_reduction_operations_axes_coeff(op, axis, coeff):
    x = randn(2, 3, 4, 5, seed=4)
    layer = build_layer(f'name: "r" type: "Reduction" bottom: "x" top: "y" reduction_param {{ '
                        f'operation: {op} axis: {axis} coeff: {coeff} }}', [x.shape])
    a = axis % 4
    rows = x.numpy().reshape(int(np.prod(x.shape[:a])), -1)
    f = {"SUM": lambda r: r.sum(), "ASUM": lambda r: np.abs(r).sum(),
         "SUMSQ": lambda r: (r * r).sum(), "MEAN": lambda r: r.mean()}[op]
    ref = np.array([f(r) * coeff for r in rows]).reshape(x.shape[:a])
    y = layer(x)
    assert tuple(y.shape) == tuple(x.shape[:a])
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)   # MEAN's coeff/dim is float32
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(),))


# ---------------------------------------------------------------------------------------- PReLU
@pytest.mark.parametrize("shared", [True, False])
def test_prelu_channel_shared_and_per_channel(shared):
    x = randn(3, 4, 2, 3, seed=5)
    text = f"prelu_param {{ channel_shared: {str(shared).lower()} }}"
    layer = build_layer(f'name: "p" type: "PReLU" bottom: "x" top: "y" {text}', [x.shape])
    assert tuple(layer.slope.shape) == (() if shared else (4,))
    assert (layer.slope == 0.25).all()                     # default filler
    with torch.no_grad():
        layer.slope.copy_(torch.tensor(0.3) if shared else torch.tensor([0.1, -0.2, 0.5, 1.5]))
    slopes = [0.3] * 4 if shared else [0.1, -0.2, 0.5, 1.5]
    y = layer(x.float()).double()
    xs = x.numpy()
    ref = np.where(xs > 0, xs, xs * np.array(slopes, dtype=np.float32).reshape(1, 4, 1, 1))
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-6)
    layer.double()
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(),))
    layer.zero_grad()
    dy = randn(*x.shape, seed=6)
    layer(x).backward(dy)
    per_channel = (dy * x * (x <= 0)).sum((0, 2, 3))
    ref_grad = per_channel.sum() if shared else per_channel
    np.testing.assert_allclose(layer.slope.grad.numpy(), ref_grad.numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------------------- Bias
@pytest.mark.parametrize("params, operand_shape", [
    ("bias_param { axis: 0 num_axes: 2 }", (2, 3)),
    ("bias_param { axis: -2 num_axes: -1 }", (4, 5)),
    ("bias_param { num_axes: 0 }", ()),
    ("bias_param { axis: 2 num_axes: 1 }", (4,)),
])
def test_bias_learned_blob_axis_num_axes(params, operand_shape):
    x = randn(2, 3, 4, 5, seed=7)
    layer = build_layer(f'name: "b" type: "Bias" bottom: "x" top: "y" {params}', [x.shape]).double()
    assert tuple(layer.bias.shape) == operand_shape
    with torch.no_grad():
        layer.bias.copy_(randn(*operand_shape, seed=8))
    axis = {"(2, 3)": 0, "(4, 5)": 2, "()": 0, "(4,)": 2}[str(operand_shape)]
    b = layer.bias.detach().numpy()
    view = b.reshape((1,) * axis + b.shape + (1,) * (4 - axis - b.ndim)) if b.ndim else b
    np.testing.assert_allclose(layer(x).detach().numpy(), x.numpy() + view, rtol=1e-12)
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(),))


@pytest.mark.parametrize("axis, b_shape", [(2, (4,)), (0, (2, 3)), (1, (3, 4, 5)), (-3, (3, 4))])
def test_bias_second_bottom_axis_and_gradients(axis, b_shape):
    x, b = randn(2, 3, 4, 5, seed=9), randn(*b_shape, seed=10)
    layer = build_layer(f'name: "b" type: "Bias" bottom: "x" bottom: "c" top: "y" '
                        f'bias_param {{ axis: {axis} }}', [x.shape, b.shape])
    a = axis % 4
    view = b.numpy().reshape((1,) * a + b_shape + (1,) * (4 - a - len(b_shape)))
    np.testing.assert_allclose(layer(x, b).numpy(), x.numpy() + view, rtol=1e-12)
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(), b.requires_grad_()))


# --------------------------------------------------------------------------------- ELU, BNLL
def test_elu_alpha_and_bnll_gradients():
    x = randn(2, 3, 4, seed=11) * 3
    elu = build_layer('name: "e" type: "ELU" bottom: "x" top: "y" elu_param { alpha: 0.35 }',
                      [x.shape])
    alpha = float(np.float32(0.35))
    xs = x.numpy()
    ref = np.where(xs > 0, xs, alpha * (np.exp(np.minimum(xs, 0)) - 1))
    np.testing.assert_allclose(elu(x).numpy(), ref, rtol=1e-12)
    assert torch.autograd.gradcheck(elu, (x.clone().requires_grad_(),))
    bnll = build_layer('name: "n" type: "BNLL" bottom: "x" top: "y"', [x.shape])
    np.testing.assert_allclose(bnll(x).numpy(), np.log1p(np.exp(x.numpy())), rtol=1e-12)
    assert torch.autograd.gradcheck(bnll, (x.clone().requires_grad_(),))


# ------------------------------------------------- which layers have no backward (fork's code)
FORWARD_ONLY = ["Accuracy", "ArgMax", "Threshold", "SegAccuracy", "Im2parity"]
REFUSED_BOTTOMS = {    # type: bottoms whose gradient the original aborts on (or never computes)
    "SoftmaxWithLoss": (1,), "HingeLoss": (1,), "MultinomialLogisticLoss": (1,),
    "SigmoidCrossEntropyLoss": (1,), "InfogainLoss": (1, 2), "ContrastiveLoss": (2,),
    "DistLoss": (1,), "Embed": (0,), "BatchReindex": (1,), "Filter": (-1,), "SmoothL1Loss": (2,),
}
BOTH_WAYS = ["EuclideanLoss", "L1Loss", "SpatialProduct", "Bias", "Scale", "Eltwise", "Silence",
             "MVN", "SPP", "Pooling", "Reduction", "PReLU", "ELU", "Log", "BNLL"]


@pytest.mark.parametrize("type_name", FORWARD_ONLY + list(REFUSED_BOTTOMS) + BOTH_WAYS)
def test_backward_facts_follow_the_fork(type_name):
    cls = layer_class(type_name)
    assert cls.HAS_BACKWARD == (type_name not in FORWARD_ONLY)
    if type_name not in FORWARD_ONLY:
        assert tuple(cls.NO_GRAD_BOTTOMS) == REFUSED_BOTTOMS.get(type_name, ())


@pytest.mark.parametrize("layer_text", [
    'type: "Threshold" bottom: "xs" top: "t"',
    'type: "ArgMax" bottom: "xs" top: "t" argmax_param { axis: 1 }',
])
def test_forward_only_layer_in_a_training_net(layer_text):
    """A learnable layer feeding a forward-only layer whose output reaches the loss: the
    original aborts in backward; propagate_down: false makes it train the rest."""
    def net(extra=""):
        return sc.Net(f"""input: "x" input_shape {{ dim: 2 dim: 3 }}
layer {{ name: "s" type: "Scale" bottom: "x" top: "xs" scale_param {{ num_axes: 0 }} }}
layer {{ name: "f" {layer_text} {extra} }}
layer {{ name: "l1" type: "Reduction" bottom: "t" top: "l1" loss_weight: 1 }}
layer {{ name: "l2" type: "Reduction" bottom: "xs" top: "l2" loss_weight: 1 }}""")
    x = randn(2, 3, seed=12).float()
    first = net()
    with pytest.raises(NoBackwardError, match=r"f \((Threshold|ArgMax)\) has no backward"):
        first.loss(first(x=x)).backward()
    second = net("propagate_down: false")
    second.loss(second(x=x)).backward()
    assert second.params["s"][0].grad.item() == pytest.approx(x.sum().item())
