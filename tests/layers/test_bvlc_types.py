"""BVLC Caffe master's layer types the segaware fork lacks: Crop, Clip, Swish, Parameter, RNN,
LSTM and LSTMUnit.

No golden numbers exist for these (the fork cannot run them), so every type is checked against a
reference written from BVLC's definitions in float64 (explicit loops over time steps and streams,
the LSTM gate by gate), at several parameters and shapes; gradients by float64 gradcheck where the
backward is the true derivative and against BVLC's written-out backward formulas where it is not;
the build-time errors by their messages; and, where OpenCV's Caffe importer runs the type (Crop,
Swish with beta 1, Deconvolution + Crop), against OpenCV through a caffemodel written here.
"""
import math

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import LayerSetupError, NetBuildError
from segaware_caffe.caffe_proto import caffe_pb2, read_net, write_weights
from segaware_caffe.caffe_proto.wire import encode_len_field
from segaware_caffe.errors import NoBackwardError
from tests.layers.helpers import build, randn
from tests.tolerances import assert_close

try:
    import cv2
except ImportError:   # pragma: no cover - opencv-python-headless is a test dependency
    cv2 = None
needs_cv2 = pytest.mark.skipif(cv2 is None, reason="needs opencv-python(-headless) for cv2.dnn")


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def as_numpy(t):
    return t.detach().double().numpy()


# ================================================================================================
# Crop

def crop_reference(x, ref_shape, axis, offsets):
    """BVLC's crop_copy: top[i_0..i_last] = bottom[i_0 + off_0, ...], off = 0 before `axis`."""
    ndim = x.ndim
    axis = axis % ndim
    if len(offsets) == 0:
        offsets = [0] * (ndim - axis)
    elif len(offsets) == 1:
        offsets = list(offsets) * (ndim - axis)
    full = [0] * axis + list(offsets)
    out_shape = [x.shape[i] if i < axis else ref_shape[i] for i in range(ndim)]
    out = np.empty(out_shape)
    for index in np.ndindex(*out_shape):
        out[index] = x[tuple(i + o for i, o in zip(index, full))]
    return out


CROP_CASES = [
    # bottom shape, reference shape, crop_param text, axis, offsets
    ((2, 3, 9, 8), (1, 1, 5, 4), "offset: 2", 2, [2]),
    ((2, 3, 9, 8), (2, 3, 5, 4), "", 2, []),
    ((3, 5, 7, 6), (9, 2, 3, 4), "axis: 1 offset: 1 offset: 2 offset: 0", 1, [1, 2, 0]),
    ((3, 5, 7, 6), (1, 1, 3, 4), "axis: -2 offset: 3 offset: 1", -2, [3, 1]),
    ((4, 3, 5), (2, 2, 2), "axis: 0 offset: 1", 0, [1]),
    ((2, 2, 3, 4, 5), (1, 1, 2, 2, 3), "axis: 2 offset: 1 offset: 0 offset: 2", 2, [1, 0, 2]),
]


@pytest.mark.parametrize("shape, ref_shape, param, axis, offsets", CROP_CASES)
def test_crop_matches_bvlc_copy(shape, ref_shape, param, axis, offsets):
    layer = build(f'name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param {{ {param} }}',
                  [shape, ref_shape])
    x = randn(*shape, requires_grad=True)
    ref = torch.zeros(ref_shape, dtype=torch.float64, requires_grad=True)
    y = layer(x, ref)
    want = crop_reference(as_numpy(x), ref_shape, axis, offsets)
    assert tuple(layer.output_shapes([shape, ref_shape])[0]) == want.shape
    assert_close(as_numpy(y), want, "crop forward", rel=0, absfrac=0)
    # backward: the top diff at the window, zero elsewhere; the reference gets no gradient
    dy = randn(*y.shape, seed=1)
    dx, dref = torch.autograd.grad(y, (x, ref), dy, allow_unused=True)
    assert dref is None
    want_dx = np.zeros(shape)
    full = [0] * (axis % len(shape)) + (list(offsets) * (len(shape) - axis % len(shape))
                                        if len(offsets) == 1 else list(offsets or [0] * (len(shape) - axis % len(shape))))
    for index in np.ndindex(*y.shape):
        want_dx[tuple(i + o for i, o in zip(index, full))] = dy.numpy()[index]
    assert np.array_equal(as_numpy(dx), want_dx)


def test_crop_gradcheck():
    layer = build('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" '
                  'crop_param { axis: 1 offset: 1 offset: 0 offset: 2 }', [(2, 4, 5, 6), (2, 2, 3, 3)])
    x = randn(2, 4, 5, 6, requires_grad=True)
    ref = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: layer(v, ref), (x,))


def test_crop_window_follows_the_reference_at_every_forward():
    layer = build('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 1 }',
                  [(1, 2, 8, 8), (1, 1, 4, 4)])
    x = randn(1, 2, 11, 9)
    y = layer(x, torch.zeros(1, 1, 6, 5))
    assert torch.equal(y, x[:, :, 1:7, 1:6])
    with pytest.raises(ValueError, match=r"c \(Crop\): the crop of axis 2 is out of bounds: bottom 0 "
                                         r"has size 11 there, offset 1 \+ the reference's size 11"):
        layer(x, torch.zeros(1, 1, 11, 5))


@pytest.mark.parametrize("param, shapes, message", [
    ("offset: 1 offset: 2", [(2, 3, 9, 8), (2, 3, 5, 4)], None),
    ("axis: 1 offset: 1 offset: 2", [(2, 3, 9, 8), (2, 3, 5, 4)],
     r"crop_param.offset has 2 values; give one \(for every axis\) or one per cropped axis: 3 for "
     r"axes 1..3 of a 4-D bottom"),
    ("offset: 5", [(2, 3, 9, 8), (2, 3, 5, 4)],
     r"the crop of axis 2 is out of bounds: bottom 0 has size 9 there, offset 5 \+ the reference's "
     r"size 5 = 10 > 9"),
    ("", [(2, 3, 9, 8), (2, 3, 10, 4)], r"the crop of axis 2 is out of bounds"),
    ("axis: 4", [(2, 3, 9, 8), (2, 3, 5, 4)], r"crop_param.axis 4 is out of range for a 4-D bottom"),
    ("", [(2, 3, 9, 8), (5, 4)], r"the reference bottom 'r' has 2 axes \(5, 4\); it needs at least "
                                 r"the 4 of bottom 'x'"),
])
def test_crop_errors(param, shapes, message):
    text = f'name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param {{ {param} }}'
    if message is None:     # two offsets for the two cropped axes of axis 2: fine
        assert build(text, shapes).offsets == (1, 2)
        return
    with pytest.raises(LayerSetupError, match=r"c \(Crop\): " + message):
        build(text, shapes)


def test_crop_reference_from_a_learnable_layer_gets_no_gradient_in_a_net():
    net = sc.Net(read_net('''
        force_backward: true
        input: "x" input_shape { dim: 1 dim: 2 dim: 7 dim: 7 }
        layer { name: "conv" type: "Convolution" bottom: "x" top: "f"
                convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }
        layer { name: "crop" type: "Crop" bottom: "x" bottom: "f" top: "y" crop_param { offset: 1 } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "f" top: "loss" }
    '''), dtype=torch.float64)
    x = randn(1, 2, 7, 7, requires_grad=True)
    out = net.forward(x=x, outputs=["loss", "f"])
    out["loss"].backward()
    # the loss reaches conv only through EuclideanLoss's second bottom, never through Crop's
    # reference: conv's gradient is that of |crop(x) - conv(x)|^2 / 2 with crop(x) a constant
    y = x.detach()[:, :, 1:6, 1:6]
    conv = net.layers["conv"]
    w = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    f2 = torch.nn.functional.conv2d(x.detach(), w, b)
    loss = ((y - f2) ** 2).sum() / 2
    gw, = torch.autograd.grad(loss, [w])
    assert_close(as_numpy(conv.weight.grad), as_numpy(gw), "conv weight gradient")


@needs_cv2
@pytest.mark.parametrize("shape, ref_shape, param, axis, offsets", CROP_CASES[:4])
def test_crop_matches_opencv(tmp_path, shape, ref_shape, param, axis, offsets):
    text = (f'input: "x" input_shape {{ {" ".join(f"dim: {d}" for d in shape)} }}\n'
            f'input: "r" input_shape {{ {" ".join(f"dim: {d}" for d in ref_shape)} }}\n'
            f'layer {{ name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param {{ {param} }} }}')
    (tmp_path / "net.prototxt").write_text(text)
    x = randn(*shape, dtype=torch.float32)
    r = torch.zeros(ref_shape)
    cv_net = cv2.dnn.readNetFromCaffe(str(tmp_path / "net.prototxt"))
    cv_net.setInput(x.numpy(), "x")
    cv_net.setInput(r.numpy(), "r")
    got = sc.Net(read_net(text)).forward(x=x, r=r)["y"]
    assert np.array_equal(got.numpy(), cv_net.forward())


# ================================================================================================
# Clip

def test_clip_forward_and_gradient_at_and_beyond_the_bounds():
    layer = build('name: "c" type: "Clip" bottom: "x" top: "y" clip_param { min: -0.5 max: 0.25 }',
                  [(2, 3, 4)])
    x = randn(2, 3, 4, seed=3).float()
    x.view(-1)[:4] = torch.tensor([-0.5, 0.25, -0.75, 0.5])   # at both bounds, and beyond them
    x.requires_grad_(True)
    y = layer(x)
    assert torch.equal(y.detach(), torch.from_numpy(np.clip(x.detach().numpy(), -0.5, 0.25)))
    dy = randn(2, 3, 4, seed=4).float()
    (dx,) = torch.autograd.grad(y, x, dy)
    inside = (x.detach() >= -0.5) & (x.detach() <= 0.25)
    assert torch.equal(dx, dy * inside)
    assert dx.view(-1)[0] == dy.view(-1)[0] and dx.view(-1)[1] == dy.view(-1)[1]   # bounds pass
    assert dx.view(-1)[2] == 0 and dx.view(-1)[3] == 0


def test_clip_inverted_bounds_and_nan_follow_std_min_max():
    layer = build('name: "c" type: "Clip" bottom: "x" top: "y" clip_param { min: 1 max: -1 }', [(5,)])
    x = torch.tensor([-2.0, 0.0, 2.0, float("nan"), 1.0])
    assert torch.equal(layer(x), torch.ones(5))      # max(min, min(x, max)) = min everywhere
    nan_layer = build('name: "c" type: "Clip" bottom: "x" top: "y" clip_param { min: -1 max: 1 }', [(1,)])
    assert nan_layer(torch.tensor([float("nan")])).item() == -1.0


def test_clip_gradcheck_away_from_the_bounds():
    layer = build('name: "c" type: "Clip" bottom: "x" top: "y" clip_param { min: -0.3 max: 0.7 }',
                  [(3, 7)])
    x = randn(3, 7, seed=5)
    x = torch.where((x - -0.3).abs() < 1e-3, x + 0.01, x)
    x = torch.where((x - 0.7).abs() < 1e-3, x + 0.01, x).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_clip_needs_both_bounds():
    with pytest.raises(LayerSetupError, match=r"c \(Clip\): clip_param.max is required"):
        build('name: "c" type: "Clip" bottom: "x" top: "y" clip_param { min: 0 }', [(2,)])
    with pytest.raises(LayerSetupError, match=r"clip_param.min and clip_param.max are required"):
        build('name: "c" type: "Clip" bottom: "x" top: "y"', [(2,)])


# ================================================================================================
# Swish

@pytest.mark.parametrize("param, beta", [("", 1.0), ("swish_param { beta: 0.5 }", 0.5),
                                         ("swish_param { beta: -2 }", -2.0)])
def test_swish_forward_backward_reference(param, beta):
    layer = build(f'name: "s" type: "Swish" bottom: "x" top: "y" {param}', [(2, 3, 5)])
    x = randn(2, 3, 5, seed=6, requires_grad=True) * 3
    x.retain_grad()
    y = layer(x)
    xn = as_numpy(x)
    s = sigmoid(beta * xn)
    assert_close(as_numpy(y), xn * s, "swish forward")
    dy = randn(2, 3, 5, seed=7)
    (dx,) = torch.autograd.grad(y, x, dy)
    # d/dx x sigmoid(beta x) = sigmoid(beta x) + beta x sigmoid(beta x) (1 - sigmoid(beta x))
    assert_close(as_numpy(dx), dy.numpy() * (s + beta * xn * s * (1 - s)), "swish backward")
    leaf = x.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (leaf,))


@needs_cv2
def test_swish_matches_opencv(tmp_path):
    text = ('input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }\n'
            'layer { name: "s" type: "Swish" bottom: "x" top: "y" }')
    (tmp_path / "net.prototxt").write_text(text)
    x = randn(2, 3, 4, 5, seed=8, dtype=torch.float32) * 4
    cv_net = cv2.dnn.readNetFromCaffe(str(tmp_path / "net.prototxt"))
    cv_net.setInput(x.numpy(), "x")
    assert_close(sc.Net(read_net(text)).forward(x=x)["y"].numpy(), cv_net.forward(), "swish vs OpenCV")


# ================================================================================================
# Parameter

def test_parameter_is_a_learnable_top(tmp_path):
    text = '''
        input: "x" input_shape { dim: 2 dim: 3 }
        layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } } }
        layer { name: "prod" type: "Eltwise" bottom: "x" bottom: "p" top: "y" eltwise_param { operation: PROD } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "x" top: "loss" }
    '''
    net = sc.Net(read_net(text))
    assert [tuple(b.shape) for b in net.params["p"]] == [(2, 3)]
    assert torch.count_nonzero(net.params["p"][0]) == 0      # a fresh Caffe blob is zero
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    write_weights({"p": [values]}, tmp_path / "p.caffemodel", types={"p": "Parameter"})
    net = sc.Net(read_net(text), weights=str(tmp_path / "p.caffemodel"))
    x = randn(2, 3, seed=9, dtype=torch.float32)
    out = net.forward(x=x, outputs=["p", "loss"])
    assert np.array_equal(out["p"].detach().numpy(), values)
    out["loss"].backward()
    # loss = |x p - x|^2 / (2 N): dloss/dp = (x p - x) x / N
    want = (x.numpy() * values - x.numpy()) * x.numpy() / 2
    assert_close(net.params["p"][0].grad.numpy(), want, "parameter blob gradient")


def test_parameter_shapes_and_errors():
    scalar = build('name: "p" type: "Parameter" top: "p"', [])
    assert tuple(scalar().shape) == ()
    assert scalar.output_shapes([]) == [()]
    with pytest.raises(LayerSetupError, match=r"p \(Parameter\): parameter_param.shape dims must be "
                                              r">= 0, got \[2, -1\]"):
        build('name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: -1 } }', [])
    with pytest.raises(NetBuildError, match=r"takes exactly 0 bottom"):
        sc.Net(read_net('input: "x" input_shape { dim: 1 }\n'
                        'layer { name: "p" type: "Parameter" bottom: "x" top: "p" }'))


# ================================================================================================
# LSTMUnit

def test_lstm_unit_forward_and_bvlc_gpu_backward_formulas():
    n, h = 3, 4
    layer = build('name: "u" type: "LSTMUnit" bottom: "c0" bottom: "x" bottom: "cont" top: "c" top: "h"',
                  [(1, n, h), (1, n, 4 * h), (1, n)])
    c_prev = randn(1, n, h, seed=10, requires_grad=True)
    gates = randn(1, n, 4 * h, seed=11, requires_grad=True)
    cont = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)   # 0.5: not a 0/1 indicator
    c, hh = layer(c_prev, gates, cont)
    X = as_numpy(gates)[0]
    i, f, o, g = sigmoid(X[:, :h]), sigmoid(X[:, h:2 * h]), sigmoid(X[:, 2 * h:3 * h]), np.tanh(X[:, 3 * h:])
    k = cont.numpy()[0][:, None]
    want_c = k * f * as_numpy(c_prev)[0] + i * g
    assert_close(as_numpy(c)[0], want_c, "c")
    assert_close(as_numpy(hh)[0], o * np.tanh(want_c), "h")
    dc, dh = randn(1, n, h, seed=12), randn(1, n, h, seed=13)
    got_dc_prev, got_dx = torch.autograd.grad((c, hh), (c_prev, gates), (dc, dh))
    # BVLC's LSTMUnitBackward (GPU), written out
    tanh_c = np.tanh(want_c)
    c_term = dc.numpy()[0] + dh.numpy()[0] * o * (1 - tanh_c ** 2)
    want_dx = np.concatenate([c_term * g * i * (1 - i),
                              k * c_term * as_numpy(c_prev)[0] * f * (1 - f),
                              dh.numpy()[0] * tanh_c * o * (1 - o),
                              c_term * i * (1 - g * g)], axis=1)
    assert_close(as_numpy(got_dc_prev)[0], k * c_term * f, "c_prev diff")
    assert_close(as_numpy(got_dx)[0], want_dx, "gate input diff")


@pytest.mark.parametrize("shapes, message", [
    ([(1, 3, 4), (1, 3, 12), (1, 3)], r"bottom 'x' must hold 4 gates of the cell size 4: axis 2 of \(1, 3, 12\) should be 16"),
    ([(2, 3, 4), (1, 3, 16), (1, 3)], r"bottom 'c0' must have 3 axes with a first axis of 1"),
    ([(1, 3, 4), (1, 3, 16), (1, 3, 1)], r"bottom 'cont' must have 2 axes"),
    ([(1, 3, 4), (1, 2, 16), (1, 3)], r"the bottoms must agree on the number of streams"),
])
def test_lstm_unit_shape_errors(shapes, message):
    with pytest.raises(LayerSetupError, match=r"u \(LSTMUnit\): " + message):
        build('name: "u" type: "LSTMUnit" bottom: "c0" bottom: "x" bottom: "cont" top: "c" top: "h"', shapes)


# ================================================================================================
# LSTM and RNN: references written from BVLC's unrolled nets

def lstm_reference(x, cont, W_xc, b_c, W_hc, W_xc_static=None, x_static=None, h0=None, c0=None):
    """BVLC's LSTM, one time step and one stream at a time, gate by gate (float64)."""
    steps, streams = x.shape[:2]
    hidden = W_hc.shape[1]
    xf = x.reshape(steps, streams, -1)
    h = np.zeros((streams, hidden)) if h0 is None else h0.reshape(streams, hidden).copy()
    c = np.zeros((streams, hidden)) if c0 is None else c0.reshape(streams, hidden).copy()
    outputs = []
    for t in range(steps):
        h_next, c_next = np.empty_like(h), np.empty_like(c)
        for n in range(streams):
            h_conted = cont[t, n] * h[n]                       # Scale layer h_conted_{t-1}
            gate = W_hc @ h_conted + (W_xc @ xf[t, n] + b_c)  # transform_t + x_transform
            if W_xc_static is not None:
                gate = gate + W_xc_static @ x_static[n].reshape(-1)
            i = sigmoid(gate[0:hidden])
            f = 0.0 if cont[t, n] == 0 else cont[t, n] * sigmoid(gate[hidden:2 * hidden])
            o = sigmoid(gate[2 * hidden:3 * hidden])
            g = np.tanh(gate[3 * hidden:4 * hidden])
            c_next[n] = f * c[n] + i * g
            h_next[n] = o * np.tanh(c_next[n])
        h, c = h_next, c_next
        outputs.append(h)
    return np.stack(outputs), h, c


def rnn_reference(x, cont, W_xh, b_h, W_hh, W_ho, b_o, W_xh_static=None, x_static=None, h0=None):
    steps, streams = x.shape[:2]
    hidden = W_hh.shape[0]
    xf = x.reshape(steps, streams, -1)
    h = np.zeros((streams, hidden)) if h0 is None else h0.reshape(streams, hidden).copy()
    outputs = []
    for t in range(steps):
        h_next = np.empty_like(h)
        o = np.empty_like(h)
        for n in range(streams):
            pre = W_hh @ (cont[t, n] * h[n]) + (W_xh @ xf[t, n] + b_h)
            if W_xh_static is not None:
                pre = pre + W_xh_static @ x_static[n].reshape(-1)
            h_next[n] = np.tanh(pre)
            o[n] = np.tanh(W_ho @ h_next[n] + b_o)
        h = h_next
        outputs.append(o)
    return np.stack(outputs), h


def recurrent_text(kind, hidden, static=False, expose=False, name="rec", extra=""):
    bottoms = ['"x"', '"cont"'] + (['"xs"'] if static else [])
    tops = ['"y"']
    if expose:
        states = ["h"] if kind == "RNN" else ["h", "c"]
        bottoms += [f'"{s}0"' for s in states]
        tops += [f'"{s}T"' for s in states]
    return (f'name: "{name}" type: "{kind}" ' + " ".join(f"bottom: {b}" for b in bottoms) + " "
            + " ".join(f"top: {t}" for t in tops)
            + f' recurrent_param {{ num_output: {hidden} {"expose_hidden: true" if expose else ""} '
              f'weight_filler {{ type: "uniform" min: -0.6 max: 0.6 }} '
              f'bias_filler {{ type: "uniform" min: -0.3 max: 0.3 }} {extra} }}')


def recurrent_shapes(steps, streams, in_shape, hidden, static_shape=None, states=0):
    shapes = [(steps, streams, *in_shape), (steps, streams)]
    if static_shape is not None:
        shapes.append((streams, *static_shape))
    shapes += [(1, streams, hidden)] * states
    return shapes


CONT = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=np.float64)


@pytest.mark.parametrize("in_shape, static_shape", [((5,), None), ((2, 3), None), ((4,), (2, 3))])
def test_lstm_matches_reference(in_shape, static_shape):
    steps, streams, hidden = 5, 3, 4
    static = static_shape is not None
    layer = build(recurrent_text("LSTM", hidden, static),
                  recurrent_shapes(steps, streams, in_shape, hidden, static_shape)).double()
    names = ["W_xc", "b_c"] + (["W_xc_static"] if static else []) + ["W_hc"]
    d, ds = math.prod(in_shape), math.prod(static_shape or ())
    want_shapes = [(4 * hidden, d), (4 * hidden,)] + ([(4 * hidden, ds)] if static else []) + \
                  [(4 * hidden, hidden)]
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == want_shapes
    assert [b is getattr(layer, n) for b, n in zip(layer.caffe_blobs(), names)] == [True] * len(names)
    x = randn(steps, streams, *in_shape, seed=20)
    xs = randn(streams, *static_shape, seed=21) if static else None
    cont = torch.from_numpy(CONT)
    y = layer(x, cont, *([xs] if static else []))
    blobs = {n: as_numpy(getattr(layer, n)) for n in names}
    want, _, _ = lstm_reference(x.numpy(), CONT, blobs["W_xc"], blobs["b_c"], blobs["W_hc"],
                                blobs.get("W_xc_static"), None if xs is None else xs.numpy())
    assert_close(as_numpy(y), want, "LSTM h")


def test_lstm_float32_matches_reference():
    steps, streams, d, hidden = 5, 3, 6, 7
    layer = build(recurrent_text("LSTM", hidden), recurrent_shapes(steps, streams, (d,), hidden))
    x = randn(steps, streams, d, seed=22, dtype=torch.float32)
    y = layer(x, torch.from_numpy(CONT).float())
    want, _, _ = lstm_reference(x.double().numpy(), CONT, *(as_numpy(b) for b in layer.caffe_blobs()))
    assert_close(y.detach().numpy(), want, "LSTM float32 h")


@pytest.mark.parametrize("static", [False, True])
def test_rnn_matches_reference(static):
    steps, streams, hidden = 5, 3, 4
    static_shape = (3,) if static else None
    layer = build(recurrent_text("RNN", hidden, static),
                  recurrent_shapes(steps, streams, (2, 2), hidden, static_shape)).double()
    names = ["W_xh", "b_h"] + (["W_xh_static"] if static else []) + ["W_hh", "W_ho", "b_o"]
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == \
        [(hidden, 4), (hidden,)] + ([(hidden, 3)] if static else []) + [(hidden, hidden), (hidden, hidden), (hidden,)]
    x = randn(steps, streams, 2, 2, seed=23)
    xs = randn(streams, 3, seed=24) if static else None
    y = layer(x, torch.from_numpy(CONT), *([xs] if static else []))
    blobs = {n: as_numpy(getattr(layer, n)) for n in names}
    want, _ = rnn_reference(x.numpy(), CONT, blobs["W_xh"], blobs["b_h"], blobs["W_hh"], blobs["W_ho"],
                            blobs["b_o"], blobs.get("W_xh_static"), None if xs is None else xs.numpy())
    assert_close(as_numpy(y), want, "RNN o")


def test_lstm_expose_hidden_states_and_their_gradients():
    steps, streams, d, hidden = 4, 2, 3, 5
    layer = build(recurrent_text("LSTM", hidden, expose=True),
                  recurrent_shapes(steps, streams, (d,), hidden, states=2)).double()
    assert not layer.HAS_SIDE_EFFECTS
    x = randn(steps, streams, d, seed=25, requires_grad=True)
    h0 = randn(1, streams, hidden, seed=26, requires_grad=True)
    c0 = randn(1, streams, hidden, seed=27, requires_grad=True)
    cont = torch.tensor([[1.0, 0.0], [1, 1], [0, 1], [1, 1]], dtype=torch.float64)
    y, hT, cT = layer(x, cont, h0, c0)
    want, want_h, want_c = lstm_reference(x.detach().numpy(), cont.numpy(),
                                          *(as_numpy(b) for b in layer.caffe_blobs()),
                                          h0=h0.detach().numpy(), c0=c0.detach().numpy())
    assert_close(as_numpy(y), want, "h")
    assert_close(as_numpy(hT)[0], want_h, "hT")
    assert_close(as_numpy(cT)[0], want_c, "cT")
    assert tuple(hT.shape) == tuple(cT.shape) == (1, streams, hidden)
    # Caffe shares only the data of h0/c0 and hT/cT with its inner net: no gradient through them
    assert not hT.requires_grad and not cT.requires_grad
    gx, gh0, gc0 = torch.autograd.grad(y.sum(), (x, h0, c0), allow_unused=True)
    assert gx is not None and gh0 is None and gc0 is None


def test_rnn_expose_hidden_gives_h_not_o():
    steps, streams, hidden = 3, 2, 4
    layer = build(recurrent_text("RNN", hidden, expose=True),
                  recurrent_shapes(steps, streams, (3,), hidden, states=1)).double()
    x, h0 = randn(steps, streams, 3, seed=28), randn(1, streams, hidden, seed=29)
    cont = torch.ones(steps, streams, dtype=torch.float64)
    y, hT = layer(x, cont, h0)
    want, want_h = rnn_reference(x.numpy(), cont.numpy(), *(as_numpy(b) for b in layer.caffe_blobs()),
                                 h0=h0.numpy())
    assert_close(as_numpy(y), want, "o")
    assert_close(as_numpy(hT)[0], want_h, "hT")


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_state_carries_over_forwards_like_caffe(kind):
    """Without expose_hidden a forward starts from the previous forward's final states: two
    forwards of T steps equal one forward of 2T steps; reset() forgets the states."""
    steps, streams, d, hidden = 3, 2, 3, 4
    first = build(recurrent_text(kind, hidden), recurrent_shapes(steps, streams, (d,), hidden)).double()
    long = build(recurrent_text(kind, hidden), recurrent_shapes(2 * steps, streams, (d,), hidden)).double()
    long.load_state_dict(first.state_dict())
    assert first.HAS_SIDE_EFFECTS
    x = randn(2 * steps, streams, d, seed=30)
    cont = torch.ones(2 * steps, streams, dtype=torch.float64)
    cont[0] = 0
    cont[4, 1] = 0
    whole = long(x, cont)
    a = first(x[:steps], cont[:steps])
    b = first(x[steps:], cont[steps:])
    assert_close(as_numpy(torch.cat([a, b])), as_numpy(whole), "two forwards vs one")
    first.reset()
    c = first(x[steps:], cont[steps:])
    fresh = build(recurrent_text(kind, hidden), recurrent_shapes(steps, streams, (d,), hidden)).double()
    fresh.load_state_dict(first.state_dict())
    assert torch.equal(c, fresh(x[steps:], cont[steps:]))
    # fewer streams: the first values of the state memory; more streams than it holds: zeros
    first(x[:steps], cont[:steps])
    one = first(x[steps:, :1], cont[steps:, :1])
    assert_close(as_numpy(one), as_numpy(b[:, :1]), "first stream continues")
    three = first(torch.cat([x[steps:]] * 2, 1)[:, :3], torch.ones(steps, 3, dtype=torch.float64))
    fresh.reset()
    assert torch.equal(three, fresh(torch.cat([x[steps:]] * 2, 1)[:, :3], torch.ones(steps, 3, dtype=torch.float64)))


@pytest.mark.parametrize("kind, static", [("LSTM", False), ("LSTM", True), ("RNN", True)])
def test_recurrent_gradcheck(kind, static):
    steps, streams, d, hidden = 3, 2, 3, 2
    layer = build(recurrent_text(kind, hidden, static),
                  recurrent_shapes(steps, streams, (d,), hidden, (2,) if static else None)).double()
    names = [n for n in layer.CAFFE_BLOBS if getattr(layer, n) is not None]
    params = tuple(getattr(layer, n).detach().clone().requires_grad_(True) for n in names)
    x = randn(steps, streams, d, seed=31, requires_grad=True)
    xs = randn(streams, 2, seed=32, requires_grad=True)
    # cont 0 at t = 0 (the carried state does not enter), fractional values later: the GPU
    # backward is the true derivative for those too
    cont = torch.tensor([[0.0, 0.0], [1.0, 0.5], [0.25, 1.0]], dtype=torch.float64)

    def run(x, xs, *blobs):
        out = torch.func.functional_call(layer, dict(zip(names, blobs)),
                                         (x, cont, xs) if static else (x, cont))
        return out

    assert torch.autograd.gradcheck(run, (x, xs) + params)


@pytest.mark.parametrize("text, shapes, message", [
    ('recurrent_param { }', [(3, 2, 4), (3, 2)], r"recurrent_param.num_output is required and must be > 0"),
    ('recurrent_param { num_output: 2 }', [(3, 2, 4), (3, 3)],
     r"bottom 'cont' \(the continuation indicators\) must have shape \(T, N\) = \(3, 2\)"),
    ('recurrent_param { num_output: 2 }', [(3,), (3, 2)], r"bottom 'x' must have at least 2 axes"),
    ('recurrent_param { num_output: 2 }', [(3, 2, 4), (3, 2), (3, 5)],
     r"bottom 'xs' \(the static input\) must have the 2 streams of 'x' on its first axis, got \(3, 5\)"),
])
def test_lstm_shape_errors(text, shapes, message):
    bottoms = ' bottom: "x" bottom: "cont"' + (' bottom: "xs"' if len(shapes) > 2 else "")
    with pytest.raises(LayerSetupError, match=r"l \(LSTM\): " + message):
        build(f'name: "l" type: "LSTM"{bottoms} top: "y" {text}', shapes)


def test_recurrent_bottom_and_top_counts_follow_expose_hidden():
    with pytest.raises(LayerSetupError, match=r"l \(LSTM\): takes 4 or 5 bottoms \(x, cont, an optional "
                                              r"x_static and the initial states h0 and c0"):
        build('name: "l" type: "LSTM" bottom: "x" bottom: "cont" bottom: "h0" top: "y" top: "hT" top: "cT" '
              'recurrent_param { num_output: 2 expose_hidden: true }', [(3, 2, 4), (3, 2), (1, 2, 2)])
    with pytest.raises(LayerSetupError, match=r"l \(LSTM\): takes 1 top\(s\) \(the output only; "
                                              r"expose_hidden: true adds the final states\), got 2"):
        build('name: "l" type: "LSTM" bottom: "x" bottom: "cont" top: "y" top: "hT" '
              'recurrent_param { num_output: 2 }', [(3, 2, 4), (3, 2)])
    with pytest.raises(LayerSetupError, match=r"r \(RNN\): bottom 'h0' \(the initial state h0\) must "
                                              r"have shape \(1, N, num_output\) = \(1, 2, 3\), got \(1, 2, 2\)"):
        build('name: "r" type: "RNN" bottom: "x" bottom: "cont" bottom: "h0" top: "y" top: "hT" '
              'recurrent_param { num_output: 3 expose_hidden: true }', [(3, 2, 4), (3, 2), (1, 2, 2)])
    layer = build('name: "l" type: "LSTM" bottom: "x" bottom: "cont" top: "y" recurrent_param { num_output: 2 }',
                  [(3, 2, 4), (3, 2)])
    with pytest.raises(ValueError, match=r"l \(LSTM\): cont must have shape \(T, N\) = \(3, 2\), got \(3, 1\)"):
        layer(torch.zeros(3, 2, 4), torch.zeros(3, 1))


def test_recurrent_refuses_a_gradient_into_cont():
    net = sc.Net(read_net('''
        force_backward: true
        input: "x" input_shape { dim: 3 dim: 2 dim: 4 }
        layer { name: "cont" type: "Parameter" top: "cont" parameter_param { shape { dim: 3 dim: 2 } } }
        layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "y"
                recurrent_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
        layer { name: "loss" type: "Reduction" bottom: "y" top: "loss" loss_weight: 1 }
    '''))
    out = net.forward(x=randn(3, 2, 4, dtype=torch.float32))
    with pytest.raises(NoBackwardError, match=r"lstm \(LSTM\) cannot backpropagate into bottom 1 \('cont'\)"):
        out["loss"].backward()


def _bvlc_layer_bytes(layer):
    """A LayerParameter serialised the way BVLC Caffe writes it: fields that our schema numbers
    1000 + n (BVLC's numbers clash with the fork's) written under BVLC's number n."""
    moved = caffe_pb2.LayerParameter()
    moved.CopyFrom(layer)
    extra = b""
    for field, value in layer.ListFields():
        if field.number > 1000 and field.message_type is not None:
            moved.ClearField(field.name)
            payload = value.SerializeToString()
            extra += encode_len_field(field.number - 1000, payload)
    return moved.SerializeToString() + extra


def test_bvlc_lstm_caffemodel_loads_by_layer_name(tmp_path):
    """A BVLC .caffemodel keeps the LSTM's inner-net blobs on the LSTM layer, in the order the
    unrolled net first uses them (W_xc, b_c, W_xc_static, W_hc), with recurrent_param under
    BVLC's field number 146."""
    steps, streams, d, ds, hidden = 4, 3, 5, 2, 3
    prototxt = f'''
        input: "x" input_shape {{ dim: {steps} dim: {streams} dim: {d} }}
        input: "cont" input_shape {{ dim: {steps} dim: {streams} }}
        input: "xs" input_shape {{ dim: {streams} dim: {ds} }}
        layer {{ name: "lstm1" type: "LSTM" bottom: "x" bottom: "cont" bottom: "xs" top: "h"
                recurrent_param {{ num_output: {hidden} }} }}
    '''
    rng = np.random.default_rng(0)
    blobs = [rng.uniform(-0.5, 0.5, s).astype(np.float32)
             for s in [(4 * hidden, d), (4 * hidden,), (4 * hidden, ds), (4 * hidden, hidden)]]
    layer = caffe_pb2.LayerParameter(name="lstm1", type="LSTM", bottom=["x", "cont", "xs"], top=["h"])
    layer.recurrent_param.num_output = hidden
    for array in blobs:
        blob = layer.blobs.add()
        blob.shape.dim.extend(array.shape)
        blob.data.extend(array.ravel().tolist())
    payload = _bvlc_layer_bytes(layer)
    data = encode_len_field(100, payload)   # NetParameter.layer = 100
    path = tmp_path / "bvlc_lstm.caffemodel"
    path.write_bytes(data)
    net = sc.Net(read_net(prototxt), weights=str(path))
    assert [np.array_equal(p.detach().numpy(), b) for p, b in zip(net.params["lstm1"], blobs)] == [True] * 4
    x = randn(steps, streams, d, seed=33, dtype=torch.float32)
    xs = randn(streams, ds, seed=34, dtype=torch.float32)
    cont = torch.from_numpy(CONT[:steps]).float()
    got = net.forward(x=x, cont=cont, xs=xs)["h"]
    want, _, _ = lstm_reference(x.double().numpy(), CONT[:steps], blobs[0], blobs[1], blobs[3],
                                blobs[2], xs.double().numpy())
    assert_close(got.detach().numpy(), want, "LSTM from a BVLC caffemodel")
    # and the file our own writer makes from that net loads back the same
    net.save_weights(tmp_path / "ours.caffemodel")
    again = sc.Net(read_net(prototxt), weights=str(tmp_path / "ours.caffemodel"))
    assert torch.equal(again.forward(x=x, cont=cont, xs=xs)["h"], got)


# ================================================================================================
# An FCN-style net: Convolution, Deconvolution (bilinear upsampling) and Crop

FCN = '''
name: "fcn_tiny"
input: "data" input_shape { dim: 1 dim: 3 dim: 13 dim: 11 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 5 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool1" top: "score"
        convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "upscore" type: "Deconvolution" bottom: "score" top: "upscore"
        convolution_param { num_output: 2 group: 2 kernel_size: 4 stride: 2 bias_term: false
                            weight_filler { type: "bilinear" } } }
layer { name: "crop" type: "Crop" bottom: "upscore" bottom: "data" top: "out" crop_param { axis: 2 offset: 3 } }
'''


def test_fcn_style_net_builds_runs_and_trains_through_crop():
    net = sc.Net(read_net(FCN), dtype=torch.float64)
    assert net.blob_shapes["upscore"] == (1, 2, 24, 22)
    assert net.blob_shapes["out"] == (1, 2, 13, 11)
    x = randn(1, 3, 13, 11, seed=40)
    out = net.forward(data=x, outputs=["out", "upscore"])
    assert torch.equal(out["out"], out["upscore"][:, :, 3:16, 3:14])
    out["out"].sum().backward()
    assert net.layers["score"].weight.grad.abs().sum() > 0
    # another input size: Crop follows the data blob at run time
    bigger = net.forward(data=randn(1, 3, 17, 15, seed=41))["out"]
    assert tuple(bigger.shape) == (1, 2, 17, 15)


@needs_cv2
def test_fcn_style_net_matches_opencv(tmp_path):
    net = sc.Net(read_net(FCN))
    weights = {name: [p.detach().numpy() for p in blobs] for name, blobs in net.params.items() if blobs}
    write_weights(weights, tmp_path / "fcn.caffemodel")
    (tmp_path / "fcn.prototxt").write_text(FCN)
    x = randn(1, 3, 13, 11, seed=42, dtype=torch.float32)
    cv_net = cv2.dnn.readNetFromCaffe(str(tmp_path / "fcn.prototxt"), str(tmp_path / "fcn.caffemodel"))
    cv_net.setInput(x.numpy(), "data")
    want = cv_net.forward("crop")
    ours = sc.Net(read_net(FCN), weights=str(tmp_path / "fcn.caffemodel")).forward(data=x)["out"]
    assert_close(ours.detach().numpy(), want, "FCN-style net vs OpenCV")
