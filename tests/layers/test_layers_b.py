"""Standard layers, group B: neuron layers, Eltwise, Tile/Slice/Concat/Split/Silence, Dropout,
Reshape/Flatten, Softmax/SoftmaxWithLoss, Accuracy, ArgMax, EuclideanLoss, Reduction and the
fork's ChannelReduce and SegAccuracy.

Golden cases are run layer by layer (built from the case prototxt, Caffe's Split inserted where a
blob has several consumers), forward and backward; the other tests check the maths with float64
gradcheck or small references written from the definitions, and the build-time errors.
"""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from segaware_caffe.caffe_proto import read_net
from segaware_caffe import BuildContext, LayerSetupError
from segaware_caffe.errors import NoBackwardError
from segaware_caffe.layer import layer_class
from tests.conftest import cpu_and_cuda

GOLDEN_CASES = [
    "absval", "argmax_axis1", "argmax_topk2_maxval", "channelreduce_max", "channelreduce_sum",
    "concat_axis1", "dropout_testphase", "eltwise_max3", "eltwise_prod", "eltwise_sum_coeff",
    "exp_base2_scale0.5_shift0.1", "exp_scaleneg1", "flatten", "power_scale_shift_power2",
    "relu_negslope", "reshape", "segaccuracy_ignore255", "sigmoid", "silence", "slice_equal",
    "slice_points", "softmax", "softmaxloss_ignore255", "softmaxloss_normalize_false", "split",
    "tanh", "tile_axis1_x5",
]
FORWARD_EXACT = ("ArgMax",)        # integer-valued tops: exact
FORWARD_1E6 = ("SegAccuracy",)     # ratios of pixel counts: within 1e-6


def assert_close(got, ref, what):
    """Golden tolerance: |got - ref| <= 1e-4 |ref| + 1e-5 max|ref|, elementwise; returns the max
    abs error relative to max|ref|."""
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, float)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = np.abs(got - ref)
    bad = err > 1e-4 * np.abs(ref) + 1e-5 * scale
    if bad.any():
        index = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} elements off, max abs error {err.max():.3g} "
                             f"at {index} (got {got[index]}, expected {ref[index]})")
    return float(err.max() / scale) if scale else float(err.max(initial=0.0))


def build(layer_param, bottom_shapes, phase="TEST", top_names=None):
    if isinstance(layer_param, str):
        layer_param = read_net(f"layer {{ {layer_param} }}").layer[0]
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase=phase,
                       bottom_shapes=[tuple(s) for s in bottom_shapes],
                       bottom_names=list(layer_param.bottom),
                       top_names=list(top_names if top_names is not None else layer_param.top))
    return layer_class(layer_param.type, layer_param.name).from_proto(layer_param, ctx)


def as_tuple(tops):
    return (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)


def randn(*shape, seed=0, dtype=torch.float64, requires_grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.requires_grad_(requires_grad)


def run_case(root):
    """Run a golden layer case; returns (blobs, data, meta, layer types by top name)."""
    net = read_net(root / "net.prototxt")
    meta = json.loads((root / "meta.json").read_text())
    data = np.load(root / "data.npz")
    blobs = {name: torch.tensor(data[f"in/{name}"], requires_grad=True) for name in net.input}
    producer = {name: ("input", i) for i, name in enumerate(net.input)}
    consumers = {}
    for lp in net.layer:
        for b in lp.bottom:
            consumers[b] = consumers.get(b, 0) + 1
    split_of, used = {}, {}
    types = {}

    def bottom(name):
        # Caffe's Split insertion: consumer k of a blob read k times gets <blob>_<src>_<i>_split_k
        if consumers.get(name, 0) < 2:
            return blobs[name]
        if name not in split_of:
            src, index = producer[name]
            tops = [f"{name}_{src}_{index}_split_{k}" for k in range(consumers[name])]
            split = build(f'name: "{name}_split" type: "Split" bottom: "{name}"',
                          [blobs[name].shape], meta["phase"], top_names=tops)
            for top, value in zip(tops, split(blobs[name])):
                value.retain_grad()
                blobs[top] = value
            split_of[name] = tops
        k = used.get(name, 0)
        used[name] = k + 1
        return blobs[split_of[name][k]]

    for lp in net.layer:
        bottoms = [bottom(b) for b in lp.bottom]
        # as sc.Net does with force_backward: a fed input gets no gradient where the layer
        # refuses one (a label), rather than an error
        refuses = layer_class(lp.type).refuses_gradient
        bottoms = [b.detach() if name in net.input and refuses(i, len(bottoms)) else b
                   for i, (name, b) in enumerate(zip(lp.bottom, bottoms))]
        layer = build(lp, [b.shape for b in bottoms], meta["phase"])
        for i, (top, value) in enumerate(zip(lp.top, as_tuple(layer(*bottoms)))):
            if value.requires_grad:
                value.retain_grad()
            blobs[top] = value
            producer[top] = (lp.name, i)
            types[top] = lp.type
    return blobs, data, meta, types


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_case(golden, case):
    blobs, data, meta, types = run_case(golden / "layers" / case)
    errors = {}
    for key in data.files:
        if not key.startswith("out/"):
            continue
        name = key[4:]
        got, ref = blobs[name].detach().numpy().astype(np.float64), data[key].astype(np.float64)
        if case == "reshape":
            # Net::Forward zeroes element 0 of every net output before the layers run (SEMANTICS
            # §11.6); Reshape's top shares the bottom's memory from setup on, so that zero shows
            # in both blobs. A net-level rule (sc.Net does it; tests/golden checks it), not the
            # layer's: element 0 is left out here.
            assert ref.flat[0] == 0
            got.flat[0] = ref.flat[0]
        if types.get(name) in FORWARD_EXACT:
            np.testing.assert_array_equal(got, ref, err_msg=f"{case}: {key}")
        elif types.get(name) in FORWARD_1E6:
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6, err_msg=f"{case}: {key}")
        else:
            errors[key] = assert_close(got, ref, f"{case}: {key}")
    if meta["backward"]:
        if meta["loss_tops"]:
            tops = list(meta["loss_tops"])
            seeds = [torch.tensor(float(w)) for w in meta["loss_tops"].values()]
        else:
            tops = [k[len("topdiff/"):] for k in data.files if k.startswith("topdiff/")]
            seeds = [torch.from_numpy(data[f"topdiff/{t}"]) for t in tops]
        torch.autograd.backward([blobs[t] for t in tops], seeds)
        for key in data.files:
            if key.startswith("diff/"):
                value = blobs[key[5:]]
                grad = value.grad if value.grad is not None else torch.zeros_like(value)
                errors[key] = assert_close(grad, data[key], f"{case}: {key}")
    print(f"{case}: max error / max|ref|: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


# ------------------------------------------------------------------------------------------------
# Neuron layers

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
    # the original has no backward: asking a gradient through it is an error, not a zero
    y = layer(torch.tensor([-1.0, 0.0, 2.0], requires_grad=True))
    assert y.tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(NoBackwardError, match=r"\(Threshold\) has no backward"):
        y.sum().backward()


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


# ------------------------------------------------------------------------------------------------
# Eltwise

def eltwise(params, n=3, shape=(2, 3, 4, 5)):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(n))
    return build(f'name: "e" type: "Eltwise" {bottoms} top: "y" eltwise_param {{ {params} }}',
                 [shape] * n)


@pytest.mark.parametrize("params", ["operation: PROD", "operation: PROD stable_prod_grad: false",
                                    "operation: SUM coeff: 0.5 coeff: -2 coeff: 3",
                                    "operation: SUM", "operation: MAX"])
def test_eltwise_gradcheck(params):
    layer = eltwise(params)
    xs = [randn(2, 3, 4, 5, seed=i).requires_grad_(True) for i in range(3)]
    assert torch.autograd.gradcheck(layer, xs)


def test_eltwise_prod_gradients_at_zero():
    a = torch.tensor([0.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0, 5.0], requires_grad=True)
    eltwise("operation: PROD", n=2, shape=(2,))(a, b).sum().backward()
    assert a.grad.tolist() == [3.0, 5.0] and b.grad.tolist() == [0.0, 2.0]
    a.grad = b.grad = None
    eltwise("operation: PROD stable_prod_grad: false", n=2, shape=(2,))(a, b).sum().backward()
    assert math.isnan(a.grad[0]) and a.grad[1] == 5.0 and b.grad.tolist() == [0.0, 2.0]


def test_eltwise_max_routes_whole_gradient_to_one_bottom():
    xs = [torch.tensor([1.0, 5.0, 2.0], requires_grad=True), torch.tensor([4.0, 5.0, 0.0], requires_grad=True),
          torch.tensor([3.0, 1.0, 2.0], requires_grad=True)]
    y = eltwise("operation: MAX", shape=(3,))(*xs)
    assert y.tolist() == [4.0, 5.0, 2.0]
    y.backward(torch.tensor([10.0, 20.0, 30.0]))
    routed = torch.stack([x.grad for x in xs])
    assert routed.sum(0).tolist() == [10.0, 20.0, 30.0]       # never split between tied bottoms
    assert routed[1, 0] == 10.0


@pytest.mark.parametrize("params, shapes, match", [
    ("operation: PROD coeff: 1 coeff: 2", [(2, 3)] * 2, r"e \(Eltwise\): eltwise_param.coeff is only allowed with operation SUM"),
    ("operation: MAX coeff: 1 coeff: 2", [(2, 3)] * 2, r"only allowed with operation SUM, got operation MAX"),
    ("coeff: 1", [(2, 3)] * 2, r"one value per bottom: got 1 values for 2 bottoms"),
    ("operation: SUM", [(2, 3), (2, 4)], r"same shape: bottom 'b1' has \(2, 4\)"),
])
def test_eltwise_errors(params, shapes, match):
    with pytest.raises(LayerSetupError, match=match):
        build(f'name: "e" type: "Eltwise" bottom: "b0" bottom: "b1" top: "y" eltwise_param {{ {params} }}',
              shapes)


# ------------------------------------------------------------------------------------------------
# Tile, Slice, Concat, Split, Silence

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


def test_split_tops_share_data_and_keep_their_own_gradients():
    layer = build('name: "s" type: "Split" bottom: "x" top: "a" top: "b" top: "c"', [(2, 3)])
    x = randn(2, 3, requires_grad=True)
    tops = layer(x)
    assert len(tops) == 3 and all(t.data_ptr() == x.data_ptr() for t in tops)
    for t in tops:
        t.retain_grad()
    (tops[0] * 2 + tops[2] * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((2, 3), 5.0, dtype=torch.float64))
    assert tops[0].grad.eq(2).all() and tops[1].grad is None and tops[2].grad.eq(3).all()


def test_silence_has_no_tops():
    layer = build('name: "s" type: "Silence" bottom: "x" bottom: "y"', [(2, 3), (4,)])
    assert layer(torch.ones(2, 3), torch.ones(4)) == ()
    assert layer.output_shapes([(2, 3), (4,)]) == []
    assert layer_class("Silence").TOPS == (0, 0)


# ------------------------------------------------------------------------------------------------
# Dropout, Reshape, Flatten

def test_dropout_test_phase_is_identity_and_train_phase_scales_kept_units():
    text = 'name: "d" type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 0.25 }'
    x = torch.ones(200, 100, requires_grad=True)
    assert build(text, [x.shape], phase="TEST")(x) is x
    torch.manual_seed(0)
    y = build(text, [x.shape], phase="TRAIN")(x)
    kept = y != 0
    assert torch.allclose(y[kept], torch.tensor(1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, kept.float() * np.float32(2 / 0.75))
    with pytest.raises(LayerSetupError, match=r"d \(Dropout\): dropout_param.dropout_ratio must be in \[0, 1\), got 1"):
        build('name: "d" type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 1 }', [(2,)])


@pytest.mark.parametrize("params, shape, expected", [
    ("shape { dim: 0 dim: -1 dim: 4 }", (2, 3, 4, 6), (2, 18, 4)),
    ("shape { dim: -1 }", (2, 3, 4), (24,)),
    ("shape { dim: 2 dim: 2 } axis: 1 num_axes: 1", (3, 4, 5), (3, 2, 2, 5)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (3, 4), (1, 3, 4)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (3, 4), (3, 4, 1)),
    ("shape { dim: 0 dim: 0 dim: -1 } axis: 1", (2, 3, 4, 5), (2, 3, 4, 5)),
    ("shape { dim: 6 dim: -1 } axis: -4", (2, 3, 4, 5), (2, 6, 10)),
])
def test_reshape_shapes(params, shape, expected):
    layer = build(f'name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param {{ {params} }}', [shape])
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    y = layer(x)
    assert tuple(y.shape) == expected and y.data_ptr() == x.data_ptr()
    assert layer.output_shapes([shape]) == [expected]


@pytest.mark.parametrize("params, match", [
    ("shape { dim: -1 dim: -1 }", r"r \(Reshape\): reshape_param.shape may infer \(-1\) at most one dim"),
    ("shape { dim: 5 dim: -1 }", r"cannot infer the -1 dim: bottom count 24"),
    ("shape { dim: 5 dim: 5 }", r"top shape \(5, 5\) has 25 elements but the bottom \(2, 3, 4\) has 24"),
    ("shape { dim: -2 }", r"dims must be >= -1"),
    ("shape { dim: 1 } axis: 5", r"reshape_param.axis 5 is out of range"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", r"dim 3 is 0 \(copy\) but the bottom has no axis 3"),
])
def test_reshape_errors(params, match):
    with pytest.raises(LayerSetupError, match=match):
        build(f'name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param {{ {params} }}', [(2, 3, 4)])


def test_flatten_axes():
    def flatten(params, shape):
        return build(f'name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param {{ {params} }}', [shape])
    x = torch.zeros(2, 3, 4, 5)
    assert flatten("", x.shape)(x).shape == (2, 60)
    assert flatten("axis: 0 end_axis: 1", x.shape)(x).shape == (6, 4, 5)
    assert flatten("axis: -3 end_axis: -2", x.shape)(x).shape == (2, 12, 5)
    assert flatten("axis: 2 end_axis: 2", x.shape)(x).shape == (2, 3, 4, 5)
    with pytest.raises(LayerSetupError, match=r"f \(Flatten\): flatten_param.end_axis .* must not come before axis"):
        flatten("axis: 2 end_axis: 1", x.shape)
    with pytest.raises(LayerSetupError, match=r"flatten_param.axis 4 is out of range for a 4-D bottom"):
        flatten("axis: 4", x.shape)


# ------------------------------------------------------------------------------------------------
# Softmax, SoftmaxWithLoss, EuclideanLoss, Reduction

@pytest.mark.parametrize("axis", [1, 0, -1, 2])
def test_softmax_axis_and_gradcheck(axis):
    layer = build(f'name: "s" type: "Softmax" bottom: "x" top: "y" softmax_param {{ axis: {axis} }}', [(2, 3, 4)])
    x = randn(2, 3, 4, requires_grad=True)
    assert torch.allclose(layer(x).sum(axis), torch.ones(()).double())
    assert torch.autograd.gradcheck(layer, (x,))


def softmax_loss(loss_param="", shape=(2, 3, 1, 2), tops=1, extra=""):
    top_text = 'top: "loss"' + (' top: "prob" loss_weight: 1 loss_weight: 0' if tops == 2 else "")
    return build(f'name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" {top_text} '
                 f'loss_param {{ {loss_param} }} {extra}', [shape, (shape[0], 1, *shape[2:])])


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
    # SEMANTICS Appendix B: 3 valid of 4 positions, N = 2
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


def test_euclidean_loss():
    layer = build('name: "e" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"', [(4, 3), (4, 3, 1, 1)])
    assert layer_class("EuclideanLoss").IS_LOSS
    a, b = randn(4, 3, seed=1, requires_grad=True), randn(4, 3, 1, 1, seed=2, requires_grad=True)
    loss = layer(a, b)
    assert loss.shape == () and loss.item() == pytest.approx(((a - b.reshape(4, 3)) ** 2).sum().item() / 8)
    assert torch.autograd.gradcheck(layer, (a, b))
    with pytest.raises(LayerSetupError, match=r"e \(EuclideanLoss\): bottoms must have the same number of values per item"):
        build('name: "e" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"', [(4, 3), (4, 2)])


@pytest.mark.parametrize("operation, reference", [
    ("SUM", lambda x: x.sum(-1)), ("ASUM", lambda x: x.abs().sum(-1)),
    ("SUMSQ", lambda x: (x * x).sum(-1)), ("MEAN", lambda x: x.mean(-1)),
])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reduction(operation, reference, axis):
    layer = build(f'name: "r" type: "Reduction" bottom: "x" top: "y" reduction_param {{ '
                  f'operation: {operation} axis: {axis} coeff: -1.5 }}', [(2, 3, 4)])
    x = randn(2, 3, 4, requires_grad=True)
    start = axis % 3
    expected = -1.5 * reference(x.reshape(*x.shape[:start], -1))
    torch.testing.assert_close(layer(x), expected)
    assert torch.autograd.gradcheck(layer, (x,))


# ------------------------------------------------------------------------------------------------
# Accuracy, ArgMax

def test_accuracy_top_k_ignore_and_per_class():
    layer = build('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" top: "per_class" '
                  'accuracy_param { top_k: 2 ignore_label: -1 }', [(5, 3), (5,)])
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.2, 0.6],
                           [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]], requires_grad=True)
    labels = torch.tensor([0.0, 2.0, 0.0, 1.0, -1.0])
    acc, per_class = layer(scores, labels)
    # item 0: label 0 ranks 3rd; item 1: label 2 ties class 1, higher class ranks first -> 2nd;
    # item 2: label 0 ties class 1 at 0.2, class 1 ranks above -> 3rd; item 3: 2nd; item 4 ignored
    assert acc.shape == () and acc.item() == pytest.approx(2 / 4)
    assert per_class.tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(NoBackwardError, match=r"a \(Accuracy\) has no backward"):
        acc.backward()
    top1 = build('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc"', [(5, 3), (5,)])
    assert top1(scores, torch.tensor([1.0, 0, 2, 2, 0])).item() == pytest.approx(4 / 5)
    spatial = build('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc"', [(2, 3, 4, 5), (2, 1, 4, 5)])
    x = randn(2, 3, 4, 5)
    assert spatial(x, x.argmax(1, keepdim=True).double()).item() == 1.0
    with pytest.raises(LayerSetupError, match=r"a \(Accuracy\): accuracy_param.top_k must be in 1..3"):
        build('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" accuracy_param { top_k: 4 }',
              [(5, 3), (5,)])


def test_argmax_with_axis_values_and_ties():
    x = torch.tensor([[[1.0, 3.0, 3.0, 0.0]], [[2.0, 2.0, 5.0, 5.0]]])      # (2, 1, 4)
    indices = build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: 2 top_k: 2 }', [x.shape])
    assert indices(x).tolist() == [[[2.0, 1.0]], [[3.0, 2.0]]]             # ties: higher index first
    values = build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: -1 out_max_val: true }',
                   [x.shape])
    assert values(x).tolist() == [[[3.0]], [[5.0]]]
    flat = build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 3 out_max_val: true }',
                 [x.shape])
    y = flat(x)
    assert y.shape == (2, 2, 3) and y[1].tolist() == [[3.0, 2.0, 1.0], [5.0, 5.0, 2.0]]
    assert build('name: "m" type: "ArgMax" bottom: "x" top: "y"', [(4, 6)])(torch.eye(4, 6)).shape == (4, 1, 1)
    with pytest.raises(LayerSetupError, match=r"m \(ArgMax\): argmax_param.top_k 5 exceeds the size 4 of axis 2"):
        build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: 2 top_k: 5 }', [x.shape])
    with pytest.raises(LayerSetupError, match=r"top_k 5 exceeds the 4 values per item"):
        build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 5 }', [x.shape])


# ------------------------------------------------------------------------------------------------
# ChannelReduce, SegAccuracy (fork layers)

def channel_reduce(params, shape):
    return build(f'name: "cr" type: "ChannelReduce" bottom: "x" top: "y" channel_reduce_param {{ {params} }}',
                 [shape])


@pytest.mark.parametrize("operation", ["SUM", "MAX"])
def test_channel_reduce_blocks_and_gradcheck(operation):
    layer = channel_reduce(f"num_channels: 3 operation: {operation}", (2, 12, 3, 5))
    x = randn(2, 12, 3, 5, requires_grad=True)
    blocks = x.reshape(2, 3, 4, 3, 5)
    expected = blocks.sum(2) if operation == "SUM" else blocks.max(2).values
    torch.testing.assert_close(layer(x), expected)
    assert torch.autograd.gradcheck(layer, (x,))


def test_channel_reduce_defaults_identity_and_errors():
    x = randn(1, 4, 2, 2)
    torch.testing.assert_close(channel_reduce("", x.shape)(x), x.max(1, keepdim=True).values)
    assert torch.equal(channel_reduce("num_channels: 4 operation: SUM", x.shape)(x), x)   # decision 3
    with pytest.raises(LayerSetupError, match=r"cr \(ChannelReduce\): channel_reduce_param.num_channels must "
                                              r"divide the bottom's 4 channels into equal blocks, got num_channels 3"):
        channel_reduce("num_channels: 3", x.shape)
    with pytest.raises(LayerSetupError, match=r"num_channels 8"):
        channel_reduce("num_channels: 8", x.shape)
    with pytest.raises(LayerSetupError, match=r"expects a 4-D \(N, C, H, W\) bottom, got shape \(4, 2\)"):
        channel_reduce("", (4, 2))


def seg_accuracy(params, scores_shape, labels_shape=None):
    n, _, h, w = scores_shape
    return build(f'name: "acc" type: "SegAccuracy" bottom: "s" bottom: "l" top: "acc" '
                 f'seg_accuracy_param {{ {params} }}', [scores_shape, labels_shape or (n, 1, h, w)])


def seg_reference(confusion):
    c = confusion.shape[0]
    correct, actual, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    accuracy = correct.sum() / confusion.sum()
    recall = np.mean([correct[i] / actual[i] for i in range(c) if actual[i]])
    union = actual + predicted - correct
    iou = np.mean([1.0 if union[i] == correct[i] else correct[i] / union[i] for i in range(c)])
    return [accuracy, recall, iou]


def test_seg_accuracy_ties_ignore_and_metrics():
    layer = seg_accuracy("ignore_label: 255 ignore_label: 7", (1, 4, 1, 7))
    per_pixel = torch.tensor([[3.0, 0, 0, 0], [0, 3, 0, 0], [0, 1, 3, 0], [0, 0, 0, 3],
                              [1, 1, 1, 1],          # four-way tie: the highest class (3) wins
                              [5, 0, 0, 0], [0, 0, 0, 0]])
    scores = per_pixel.t().reshape(1, 4, 1, 7)
    labels = torch.tensor([0.0, 1, 1, 3, 3.9, 255, 7]).reshape(1, 1, 1, 7)   # 3.9 truncates to 3
    y = layer(scores, labels)
    assert y.shape == (1, 1, 1, 3) and y.dtype == torch.float32
    confusion = np.zeros((4, 4))
    for a, p in [(0, 0), (1, 1), (1, 2), (3, 3), (3, 3)]:
        confusion[a, p] += 1
    np.testing.assert_allclose(y.flatten().numpy(), seg_reference(confusion), rtol=1e-6)
    # class 2 never appears in the labels: left out of the recall, IoU 0 (predicted once)
    np.testing.assert_allclose(y.flatten().numpy(), [4 / 5, 2.5 / 3, 2.5 / 4], rtol=1e-6)
    assert layer.output_shapes([(1, 4, 1, 7), (1, 1, 1, 7)]) == [(1, 1, 1, 3)]
    with pytest.raises(ValueError, match=r"acc \(SegAccuracy\): unexpected label 4"):
        layer(scores, torch.full((1, 1, 1, 7), 4.0))


def test_seg_accuracy_accumulates_without_reset():
    scores = randn(2, 3, 4, 5, seed=5)
    labels = torch.randint(0, 3, (2, 1, 4, 5), generator=torch.Generator().manual_seed(1)).double()
    fresh = seg_accuracy("", scores.shape)
    assert not fresh.HAS_SIDE_EFFECTS
    first, again = fresh(scores, labels), fresh(scores, labels)
    assert torch.equal(first, again)
    accumulating = seg_accuracy("reset: false", scores.shape)
    assert accumulating.HAS_SIDE_EFFECTS
    accumulating(scores, labels)
    both = accumulating(scores[:1], labels[:1])
    expected = seg_accuracy("", (3, 3, 4, 5))(torch.cat([scores, scores[:1]]), torch.cat([labels, labels[:1]]))
    torch.testing.assert_close(both, expected)
    accumulating.reset_confusion()
    torch.testing.assert_close(accumulating(scores, labels), first)


def test_seg_accuracy_shape_errors():
    with pytest.raises(LayerSetupError, match=r"acc \(SegAccuracy\): labels must have shape \(N, 1, H, W\) = "
                                              r"\(2, 1, 4, 5\) to match scores \(2, 3, 4, 5\), got \(2, 1, 4, 6\)"):
        seg_accuracy("", (2, 3, 4, 5), (2, 1, 4, 6))


# ------------------------------------------------------------------------------------------------
# Devices: every layer is plain torch; the same numbers on any device

DEVICE_LAYERS = [
    ('type: "Power" power_param { power: 3 scale: 0.5 shift: 2 }', 1), ('type: "BNLL"', 1),
    ('type: "ELU"', 1), ('type: "Exp" exp_param { scale: -1 }', 1), ('type: "AbsVal"', 1),
    ('type: "Eltwise" eltwise_param { operation: MAX }', 3),
    ('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', 2),
    ('type: "Tile" tile_param { tiles: 2 }', 1), ('type: "Softmax"', 1),
    ('type: "ChannelReduce" channel_reduce_param { num_channels: 2 operation: SUM }', 1),
    ('type: "Reduction" reduction_param { operation: ASUM axis: 1 }', 1),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("text, bottoms", DEVICE_LAYERS, ids=[t for t, _ in DEVICE_LAYERS])
def test_layer_on_device_matches_cpu(device, text, bottoms):
    names = " ".join(f'bottom: "b{i}"' for i in range(bottoms))
    layer = build(f'name: "l" {text} {names} top: "y"', [(2, 4, 3, 5)] * bottoms)
    xs = [randn(2, 4, 3, 5, seed=i, dtype=torch.float32) for i in range(bottoms)]
    seed = randn(*layer(*xs).shape, seed=9, dtype=torch.float32)
    results = []
    for dev in ("cpu", device):
        inputs = [x.to(dev).requires_grad_(True) for x in xs]
        y = layer.to(dev)(*inputs)
        y.backward(seed.to(dev))
        results.append([y.detach().cpu()] + [x.grad.cpu() for x in inputs])
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_seg_accuracy_and_softmax_loss_on_device_match_cpu():
    for device in [d for d in ("cuda",) if torch.cuda.is_available()] or ["cpu"]:
        scores = randn(2, 3, 4, 5, dtype=torch.float32).to(device)
        labels = torch.randint(0, 3, (2, 1, 4, 5), generator=torch.Generator().manual_seed(2)).float()
        labels[0, 0, 0, 0] = 255
        acc = seg_accuracy("ignore_label: 255", scores.shape).to(device)(scores, labels.to(device))
        loss = softmax_loss("ignore_label: 255", shape=(2, 3, 4, 5))(scores, labels.to(device))
        torch.testing.assert_close(acc.cpu(), seg_accuracy("ignore_label: 255", scores.shape)(scores.cpu(), labels))
        torch.testing.assert_close(loss.cpu(), softmax_loss("ignore_label: 255", shape=(2, 3, 4, 5))(scores.cpu(), labels))
