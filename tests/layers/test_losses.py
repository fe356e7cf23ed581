"""Loss layers beyond the golden cases: ContrastiveLoss, HingeLoss, InfogainLoss,
MultinomialLogisticLoss, SigmoidCrossEntropyLoss, EuclideanLoss, and the GPU-only L1Loss and
SmoothL1Loss.

Each is checked against a float64 reference written from the definition with plain loops, at
parameters and shapes other than the golden cases', with gradients (gradcheck where the original's
backward is the exact derivative, the original's formula where it is not), the refusal of label
bottoms, and the build-time errors.
"""
import math

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import LayerSetupError
from segaware_caffe.caffe_proto import write_blob
from segaware_caffe.errors import NoBackwardError
from segaware_caffe.layers.multinomial_logistic_loss import LOG_THRESHOLD
from tests.kernels.layer_helpers import build_layer


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grad_of(layer, inputs, index=0, weight=1.0):
    """d(weight * loss)/d inputs[index] by autograd (inputs are float64 tensors)."""
    x = [t.clone().requires_grad_(i == index) for i, t in enumerate(inputs)]
    (layer(*x) * weight).backward()
    return x[index].grad


# ------------------------------------------------------------------------------ ContrastiveLoss
def contrastive_reference(a, b, sim, margin, legacy):
    """(loss, d loss/d a) from the definition, pair by pair; the gradient keeps the original's
    (d + 1e-4) denominator of the non-legacy dissimilar term."""
    a, b, sim = a.numpy().reshape(len(a), -1), b.numpy().reshape(len(b), -1), sim.numpy().ravel()
    n = len(a)
    loss, grad = 0.0, np.zeros_like(a)
    for i in range(n):
        diff = a[i] - b[i]
        d2 = float(diff @ diff)
        d = math.sqrt(d2)
        if int(sim[i]) != 0:
            loss += d2
            grad[i] = diff / n
        elif legacy:
            loss += max(margin - d2, 0.0)
            grad[i] = -diff / n if margin - d2 > 0 else 0.0
        else:
            loss += max(margin - d, 0.0) ** 2
            grad[i] = -(margin - d) / (d + 1e-4) * diff / n if margin - d > 0 else 0.0
    return loss / n / 2, grad


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("margin", [0.7, 2.5])
def test_contrastive_loss_matches_definition(legacy, margin):
    n, c = 9, 5
    a, b = randn(n, c, 1, 1, seed=1) * 0.6, randn(n, c, 1, 1, seed=2) * 0.6
    # int() truncation: 0.5 and -0.7 are dissimilar, -1 and 2 similar
    sim = torch.tensor([1, 0, 0.5, -1, 0, 2, -0.7, 0, 1], dtype=torch.float64).reshape(n, 1, 1, 1)
    layer = build_layer(f'name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" '
                        f'top: "l" contrastive_loss_param {{ margin: {margin} '
                        f'legacy_version: {str(legacy).lower()} }}', [a.shape, b.shape, sim.shape])
    ref_loss, ref_grad = contrastive_reference(a, b, sim, float(np.float32(margin)), legacy)
    assert layer(a, b, sim).item() == pytest.approx(ref_loss, rel=1e-12)
    ga = grad_of(layer, [a, b, sim], 0, weight=3.0)
    gb = grad_of(layer, [a, b, sim], 1, weight=3.0)
    np.testing.assert_allclose(ga.numpy().reshape(n, c), 3.0 * ref_grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(gb.numpy(), -ga.numpy(), rtol=0, atol=0)


def test_contrastive_legacy_gradient_is_the_derivative():
    a, b = randn(6, 3, seed=3).reshape(6, 3, 1, 1), randn(6, 3, seed=4).reshape(6, 3, 1, 1)
    sim = torch.tensor([1.0, 0, 0, 1, 0, 0]).double().reshape(6, 1, 1, 1)
    layer = build_layer('name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" '
                        'top: "l" contrastive_loss_param { margin: 4 legacy_version: true }',
                        [a.shape, b.shape, sim.shape])
    assert torch.autograd.gradcheck(lambda x, y: layer(x, y, sim),
                                    (a.requires_grad_(), b.requires_grad_()))


def test_contrastive_gradient_at_zero_distance_is_finite():
    """A dissimilar pair with a == b: the original's 1e-4 keeps the gradient 0 (not NaN)."""
    a = randn(2, 3, 1, 1, seed=5)
    layer = build_layer('name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" '
                        'top: "l"', [a.shape, a.shape, (2, 1, 1, 1)])
    sim = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    assert layer(a, a.clone(), sim).item() == pytest.approx(1.0 / 2)   # margin 1: (1 - 0)^2 * 2 / 4
    grad = grad_of(layer, [a, a.clone(), sim])
    assert torch.isfinite(grad).all() and (grad == 0).all()


# ----------------------------------------------------------------------------------- HingeLoss
def hinge_reference(x, labels, norm):
    x = x.numpy().reshape(len(x), -1)
    n, dim = x.shape
    loss, grad = 0.0, np.zeros_like(x)
    for i in range(n):
        for j in range(dim):
            s = -x[i, j] if j == int(labels[i]) else x[i, j]
            m = max(0.0, 1 + s)
            sign = -1.0 if j == int(labels[i]) else 1.0
            loss += m if norm == "L1" else m * m
            grad[i, j] = sign * ((m > 0) if norm == "L1" else 2 * m) / n
    return loss / n, grad


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss_matches_definition_on_spatial_scores(norm):
    x = randn(4, 3, 2, 1, seed=6) * 1.5            # dim = 6 values per item
    labels = torch.tensor([5.0, 0.0, 2.9, 3.0], dtype=torch.float64)   # 2.9 -> class 2
    layer = build_layer(f'name: "h" type: "HingeLoss" bottom: "x" bottom: "l" top: "loss" '
                        f'hinge_loss_param {{ norm: {norm} }}', [x.shape, labels.shape])
    ref_loss, ref_grad = hinge_reference(x, labels, norm)
    assert layer(x, labels).item() == pytest.approx(ref_loss, rel=1e-12)
    grad = grad_of(layer, [x, labels], weight=0.5)
    np.testing.assert_allclose(grad.numpy().reshape(4, -1), 0.5 * ref_grad, rtol=1e-12, atol=0)


def test_hinge_l2_gradcheck_and_zero_gradient_on_the_kink():
    x = randn(3, 4, seed=7)
    labels = torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64)
    l2 = build_layer('name: "h" type: "HingeLoss" bottom: "x" bottom: "l" top: "loss" '
                     'hinge_loss_param { norm: L2 }', [x.shape, labels.shape])
    assert torch.autograd.gradcheck(lambda s: l2(s, labels), (x.clone().requires_grad_(),))
    l1 = build_layer('name: "h" type: "HingeLoss" bottom: "x" bottom: "l" top: "loss"',
                     [(1, 2), (1,)])
    on_kink = torch.tensor([[-1.0, 0.5]], dtype=torch.float64)     # 1 + x = 0 for class 0
    grad = grad_of(l1, [on_kink, torch.tensor([1.0], dtype=torch.float64)])
    assert grad.tolist() == [[0.0, -1.0]]        # sign(0) = 0; class 1 (true, m = 0.5) gets -1


def test_hinge_loss_errors_and_label_range():
    with pytest.raises(LayerSetupError, match=r"h \(HingeLoss\): the label bottom must hold one "
                                              r"label per item \(4"):
        build_layer('name: "h" type: "HingeLoss" bottom: "x" bottom: "l" top: "loss"',
                    [(4, 3), (4, 2)])
    layer = build_layer('name: "h" type: "HingeLoss" bottom: "x" bottom: "l" top: "loss"',
                        [(2, 3), (2,)])
    with pytest.raises(ValueError, match=r"h \(HingeLoss\): label 3 is outside \[0, 3\)"):
        layer(torch.zeros(2, 3), torch.tensor([0.0, 3.0]))


# ----------------------------------------------------------- MultinomialLogisticLoss, Infogain
def test_multinomial_logistic_loss_clamp_and_gradient():
    prob = rand(5, 2, 3, seed=8).reshape(5, 6)      # any positive values, 6 per item
    prob[1, 4] = 0.0                                 # clamped to 1e-20
    labels = torch.tensor([0.0, 4.0, 5.0, 2.0, 1.0], dtype=torch.float64)
    layer = build_layer('name: "m" type: "MultinomialLogisticLoss" bottom: "p" bottom: "l" '
                        'top: "loss"', [(5, 2, 3), (5, 1, 1, 1)])
    p3 = prob.reshape(5, 2, 3)
    picked = np.array([max(prob[i, int(labels[i])].item(), LOG_THRESHOLD) for i in range(5)])
    assert layer(p3, labels).item() == pytest.approx(-np.log(picked).sum() / 5, rel=1e-12)
    grad = grad_of(layer, [p3, labels], weight=2.0).reshape(5, 6).numpy()
    ref = np.zeros((5, 6))
    for i in range(5):
        ref[i, int(labels[i])] = -2.0 / 5 / picked[i]
    np.testing.assert_allclose(grad, ref, rtol=1e-12)
    assert grad[1, 4] == pytest.approx(-2.0 / 5 / LOG_THRESHOLD)    # ~ -4e19, not 0


def infogain_reference(prob, labels, H):
    n, dim = prob.shape
    loss, grad = 0.0, np.zeros((n, dim))
    for i in range(n):
        for k in range(dim):
            p = max(prob[i, k], LOG_THRESHOLD)
            loss -= H[int(labels[i]), k] * math.log(p)
            grad[i, k] = -H[int(labels[i]), k] / p / n
    return loss / n, grad


def test_infogain_loss_with_H_bottom_matches_definition():
    prob = rand(6, 5, seed=9)
    prob[2, 3] = 0.0
    labels = torch.tensor([4.0, 0, 3, 1, 1, 2], dtype=torch.float64)
    H = rand(1, 1, 5, 5, seed=10)
    layer = build_layer('name: "i" type: "InfogainLoss" bottom: "p" bottom: "l" bottom: "H" '
                        'top: "loss"', [prob.shape, labels.shape, H.shape])
    ref_loss, ref_grad = infogain_reference(prob.numpy(), labels.numpy(), H.numpy()[0, 0])
    assert layer(prob, labels, H).item() == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad_of(layer, [prob, labels, H]).numpy(), ref_grad, rtol=1e-12)


def test_infogain_loss_reads_H_from_source_relative_to_the_prototxt(tmp_path, monkeypatch):
    H = np.array([[1.0, 0.2, 0.0], [0.3, 2.0, 0.1], [0.0, 0.5, 1.5]], dtype=np.float32)
    (tmp_path / "model").mkdir()
    write_blob(H.reshape(1, 1, 3, 3), tmp_path / "model" / "H.binaryproto")
    prototxt = tmp_path / "model" / "net.prototxt"
    prototxt.write_text('input: "p" input_shape { dim: 4 dim: 3 } input: "l" input_shape { dim: 4 }\n'
                        'layer { name: "i" type: "InfogainLoss" bottom: "p" bottom: "l" top: "loss" '
                        'infogain_loss_param { source: "H.binaryproto" } }\n')
    monkeypatch.chdir(tmp_path)          # not beside the file: found relative to the prototxt
    net = sc.Net(prototxt, dtype=torch.float64)
    prob = rand(4, 3, seed=11).requires_grad_()
    labels = torch.tensor([2.0, 0, 1, 2], dtype=torch.float64)
    loss = net(p=prob, l=labels)["loss"]
    ref_loss, ref_grad = infogain_reference(prob.detach().numpy(), labels.numpy(), H.astype(float))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(prob.grad.numpy(), ref_grad, rtol=1e-12)


@pytest.mark.parametrize("text, shapes, message", [
    ('', [(2, 3), (2,)], r"infogain_loss_param.source \(a .binaryproto holding H\) is required"),
    ('infogain_loss_param { source: "missing.binaryproto" }', [(2, 3), (2,)],
     r"infogain_loss_param.source 'missing.binaryproto' not found"),
    ('infogain_loss_param { axis: 1 }', [(2, 3), (2,), (1, 1, 3, 3)],
     r"infogain_loss_param.axis belongs to BVLC master's InfogainLoss"),
    ('', [(2, 3), (2,), (3, 3)], r"the infogain bottom \(2\) must have shape \(1, 1, 3, 3\)"),
    ('', [(2, 3), (2, 2), (1, 1, 3, 3)], r"the label bottom must have shape \(2,\) or \(2, 1, 1, 1\)"),
    ('', [(2, 3), (3,), (1, 1, 3, 3)], r"the label bottom must have shape \(2,\)"),
])
def test_infogain_loss_errors(text, shapes, message):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(len(shapes)))
    with pytest.raises(LayerSetupError, match=r"i \(InfogainLoss\): " + message):
        build_layer(f'name: "i" type: "InfogainLoss" {bottoms} top: "loss" {text}', shapes)


# -------------------------------------------------------------------- SigmoidCrossEntropyLoss
def test_sigmoid_cross_entropy_soft_targets_and_gradient():
    x = randn(3, 2, 4, seed=12) * 3
    x[0, 0, 0] = 0.0
    t = rand(3, 2, 4, seed=13)                       # soft targets
    layer = build_layer('name: "s" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" '
                        'top: "loss"', [x.shape, (3, 8)])
    xs, ts = x.numpy().ravel(), t.numpy().ravel()
    ref = sum(-(v * (tt - (v >= 0)) - math.log(1 + math.exp(v - 2 * v * (v >= 0))))
              for v, tt in zip(xs, ts)) / 3          # the original's expression, N = 3 items
    assert layer(x, t.reshape(3, 8)).item() == pytest.approx(ref, rel=1e-12)
    grad = grad_of(layer, [x, t.reshape(3, 8)], weight=1.5)
    np.testing.assert_allclose(grad.numpy(), 1.5 * (torch.sigmoid(x) - t).numpy() / 3, rtol=1e-12)
    assert grad[0, 0, 0].item() == pytest.approx(1.5 * (0.5 - t[0, 0, 0].item()) / 3)
    x[0, 0, 0] = 0.3
    assert torch.autograd.gradcheck(lambda v: layer(v, t.reshape(3, 8)), (x.requires_grad_(),))


def test_sigmoid_cross_entropy_errors():
    with pytest.raises(LayerSetupError, match=r"s \(SigmoidCrossEntropyLoss\): scores \(2, 3\) and "
                                              r"targets \(2, 4\) must have the same count"):
        build_layer('name: "s" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "l"',
                    [(2, 3), (2, 4)])


def test_euclidean_loss_takes_gradients_to_both_bottoms():
    a, b = randn(3, 2, 5, seed=14), randn(3, 10, seed=15)
    layer = build_layer('name: "e" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"',
                        [a.shape, b.shape])
    diff = a.reshape(3, 10) - b
    assert layer(a, b).item() == pytest.approx((diff ** 2).sum().item() / 3 / 2)
    assert torch.autograd.gradcheck(layer, (a.clone().requires_grad_(), b.clone().requires_grad_()))
    assert not type(layer).NO_GRAD_BOTTOMS and type(layer).HAS_BACKWARD


# ------------------------------------------------------- label bottoms refuse gradients (sc.Net)
def label_net(loss_type, label, force=False, propagate_down=None):
    """x (4, 3) and a label l through a learnable scalar Scale (top ls) into loss_type."""
    # (4, 1): Scale's default axis 1 must exist
    label_shape = "dim: 4 dim: 3" if loss_type == "SigmoidCrossEntropyLoss" else "dim: 4 dim: 1"
    extra_input = ('input: "H" input_shape { dim: 1 dim: 1 dim: 3 dim: 3 }\n'
                   if loss_type == "InfogainLoss" else "")
    bottoms = f'bottom: "x" bottom: "{label}"' + (' bottom: "H"' if extra_input else "")
    pd = "".join(f" propagate_down: {str(v).lower()}" for v in propagate_down or ())
    return sc.Net(f"""force_backward: {str(force).lower()}
input: "x" input_shape {{ dim: 4 dim: 3 }}
input: "l" input_shape {{ {label_shape} }}
{extra_input}layer {{ name: "scale_l" type: "Scale" bottom: "l" top: "ls" scale_param {{ num_axes: 0 }} }}
layer {{ name: "loss" type: "{loss_type}" {bottoms} top: "loss"{pd} }}""")


@pytest.mark.parametrize("loss_type", ["HingeLoss", "MultinomialLogisticLoss", "SoftmaxWithLoss",
                                       "SigmoidCrossEntropyLoss", "InfogainLoss"])
def test_a_learnable_label_is_refused_unless_propagate_down_is_false(loss_type):
    inputs = {"x": (rand(4, 3, seed=16) + 0.1).float(),
              "l": rand(4, 3).float() if loss_type == "SigmoidCrossEntropyLoss"
              else torch.tensor([[0.0], [2], [1], [1]])}
    if loss_type == "InfogainLoss":
        inputs["H"] = torch.eye(3)
    # the label goes through a learnable scalar: the original aborts in backward
    net = label_net(loss_type, "ls")
    with pytest.raises(NoBackwardError, match=rf"loss \({loss_type}\) cannot backpropagate into"):
        net.loss(net(**inputs)).backward()
    # propagate_down: false for the label: the scale gets no gradient, the scores still do
    flags = [True, False] + ([False] if loss_type == "InfogainLoss" else [])
    net = label_net(loss_type, "ls", propagate_down=flags)
    x = inputs["x"].clone().requires_grad_()
    net.loss(net(**dict(inputs, x=x))).backward()
    assert x.grad is not None and net.params["scale_l"][0].grad is None
    # force_backward with the label fed directly: no gradient is forced into it, and no error
    net = label_net(loss_type, "l", force=True)
    labels, x = inputs["l"].clone().requires_grad_(), inputs["x"].clone().requires_grad_()
    net.loss(net(**dict(inputs, l=labels, x=x))).backward()
    assert labels.grad is None and x.grad is not None


# ------------------------------------------------------------------------- L1Loss (FlowNet, GPU)
def l1_reference(d, per_location, prescale, by_entries, eps, plateau):
    """(loss, d loss / d d) following the original's GPU code step by step, with loops."""
    d = d.numpy()
    n, c = d.shape[:2]
    spatial = d.reshape(n, c, -1)
    valid = ~np.isnan(spatial)
    normalizer = valid.sum() / c if by_entries else n
    loss, grad = 0.0, np.zeros_like(spatial)
    if per_location:
        w = float(np.float32(1) / np.float32(c)) if prescale else 1.0
        for i in range(n):
            for s in range(spatial.shape[2]):
                values = [spatial[i, k, s] if valid[i, k, s] else 0.0 for k in range(c)]
                total = sum(w * v * v for v in values)
                keep = not (plateau > 0 and abs(total) < plateau * plateau)
                total = total if keep else 0.0
                root = math.sqrt(total + eps)
                loss += root
                for k in range(c):
                    grad[i, k, s] = (0.5 / root * keep * w * 2 * values[k]) / normalizer
    else:
        for index in np.ndindex(spatial.shape):
            v = spatial[index]
            if not valid[index] or (plateau > 0 and abs(v) < plateau):
                continue
            loss += abs(v)
            grad[index] = (1.0 if v > 0 else -1.0) / normalizer    # sign(0) = -1
    return loss / normalizer, grad.reshape(d.shape)


L1_CASES = [
    dict(per_location=False, prescale=False, by_entries=False, eps=0.01, plateau=0.0),
    dict(per_location=False, prescale=False, by_entries=True, eps=0.01, plateau=0.3),
    dict(per_location=True, prescale=False, by_entries=False, eps=0.01, plateau=0.0),
    dict(per_location=True, prescale=True, by_entries=True, eps=0.05, plateau=0.4),
]


@pytest.mark.parametrize("case", L1_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("two_bottoms", [False, True])
def test_l1_loss_follows_the_gpu_code(case, two_bottoms):
    a, b = randn(2, 3, 4, 5, seed=17), randn(2, 3, 4, 5, seed=18) * 0.5
    a[0, 1, 2, 3] = float("nan")                  # a NaN entry: no loss, no gradient
    a[1, 0, 1, 1] = b[1, 0, 1, 1] if two_bottoms else 0.0      # an exact zero difference
    text = ('name: "f" type: "L1Loss" bottom: "a" ' + ('bottom: "b" ' if two_bottoms else '') +
            'top: "loss" l1_loss_param { ' +
            f'l2_per_location: {str(case["per_location"]).lower()} '
            f'l2_prescale_by_channels: {str(case["prescale"]).lower()} '
            f'normalize_by_num_entries: {str(case["by_entries"]).lower()} '
            f'epsilon: {case["eps"]} plateau: {case["plateau"]} }}')
    layer = build_layer(text, [a.shape] * (2 if two_bottoms else 1))
    bottoms = [a, b] if two_bottoms else [a]
    d = a - b if two_bottoms else a
    ref_loss, ref_grad = l1_reference(d, case["per_location"], case["prescale"], case["by_entries"],
                                      float(np.float32(case["eps"])), float(np.float32(case["plateau"])))
    assert layer(*bottoms).item() == pytest.approx(ref_loss, rel=1e-12)
    grad = grad_of(layer, bottoms, 0, weight=2.0).numpy()
    np.testing.assert_allclose(grad, 2.0 * ref_grad, rtol=1e-10, atol=1e-15)
    if not case["per_location"] and case["plateau"] == 0:
        assert grad[1, 0, 1, 1] < 0           # an exact zero difference: sign(0) = -1
    assert grad[0, 1, 2, 3] == 0              # the NaN entry
    if two_bottoms:
        np.testing.assert_array_equal(grad_of(layer, bottoms, 1, weight=2.0).numpy(), -grad)


def test_l1_loss_per_location_gradcheck():
    a = randn(2, 3, 2, 3, seed=19).requires_grad_()
    layer = build_layer('name: "f" type: "L1Loss" bottom: "a" top: "loss" '
                        'l1_loss_param { l2_per_location: true epsilon: 0.1 }', [a.shape])
    assert torch.autograd.gradcheck(layer, (a,))


def test_l1_loss_errors():
    with pytest.raises(LayerSetupError, match=r"f \(L1Loss\): both bottoms must have the same shape"):
        build_layer('name: "f" type: "L1Loss" bottom: "a" bottom: "b" top: "l"', [(2, 3), (2, 4)])
    with pytest.raises(LayerSetupError, match=r"f \(L1Loss\): bottom 0 must have at most 4 axes"):
        build_layer('name: "f" type: "L1Loss" bottom: "a" top: "l"', [(1, 2, 3, 4, 5)])


# -------------------------------------------------------------- SmoothL1Loss (Fast R-CNN, GPU)
def smooth_l1_reference(a, b, w):
    a, b = a.numpy(), b.numpy()
    w = np.ones_like(a) if w is None else w.numpy()
    n, h, wd = a.shape[0], a.shape[2], a.shape[3]
    loss, grad = 0.0, np.zeros_like(a)
    for index in np.ndindex(a.shape):
        d = w[index] * (a[index] - b[index])
        loss += 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5
        grad[index] = (d if abs(d) < 1 else np.sign(d)) / (n * h * wd)   # no factor w
    return loss / (n * h * wd), grad


@pytest.mark.parametrize("with_weights", [False, True])
def test_smooth_l1_loss_follows_the_gpu_code(with_weights):
    a, b = randn(3, 4, 2, 3, seed=20) * 2, randn(3, 4, 2, 3, seed=21)
    w = rand(3, 4, 2, 3, seed=22) * 2 if with_weights else None
    bottoms = [a, b] + ([w] if with_weights else [])
    text = ('name: "s" type: "SmoothL1Loss" bottom: "a" bottom: "b" ' +
            ('bottom: "w" ' if with_weights else '') + 'top: "loss"')
    layer = build_layer(text, [t.shape for t in bottoms])
    ref_loss, ref_grad = smooth_l1_reference(a, b, w)
    assert layer(*bottoms).item() == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad_of(layer, bottoms, 0).numpy(), ref_grad, rtol=1e-12)
    np.testing.assert_allclose(grad_of(layer, bottoms, 1).numpy(), -ref_grad, rtol=1e-12)
    if with_weights:            # the original computes no diff for the weights
        assert grad_of(layer, bottoms, 2) is None


def test_smooth_l1_loss_with_binary_weights_is_the_derivative():
    a, b = randn(2, 3, 2, 2, seed=23), randn(2, 3, 2, 2, seed=24)
    w = (rand(2, 3, 2, 2, seed=25) > 0.4).double()
    layer = build_layer('name: "s" type: "SmoothL1Loss" bottom: "a" bottom: "b" bottom: "w" '
                        'top: "l"', [a.shape] * 3)
    assert torch.autograd.gradcheck(lambda x, y: layer(x, y, w),
                                    (a.requires_grad_(), b.requires_grad_()))


def test_smooth_l1_loss_errors():
    with pytest.raises(LayerSetupError, match=r"s \(SmoothL1Loss\): bottom 2 \(2, 3\) must have the "
                                              r"shape of bottom 0 \(2, 4\)"):
        build_layer('name: "s" type: "SmoothL1Loss" bottom: "a" bottom: "b" bottom: "w" top: "l"',
                    [(2, 4), (2, 4), (2, 3)])
