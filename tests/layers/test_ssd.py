"""SSD fork layers: Normalize, Permute, PriorBox, DetectionOutput, against references written from
SSD's definitions (float64 numpy, or float32 loops where SSD's own float order matters), and a
res10-style SSD face detector against OpenCV's Caffe importer."""
import math

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.caffe_proto import caffe_pb2, read_net
from segaware_caffe.errors import LayerSetupError, NoBackwardError
from segaware_caffe.layer import BuildContext, layer_class
from segaware_caffe.layers.detection_output import nms
from tests.tolerances import assert_close


def build(text, bottom_shapes, names=None):
    layer_param = read_net(f"layer {{ {text} }}").layer[0]
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase="TEST",
                       bottom_shapes=[tuple(s) for s in bottom_shapes],
                       bottom_names=names or list(layer_param.bottom) or
                       [f"b{i}" for i in range(len(bottom_shapes))],
                       top_names=list(layer_param.top))
    return layer_class(layer_param.type, layer_param.name).from_proto(layer_param, ctx)


# ------------------------------------------------------------------------------------------------
# Normalize

def normalize_reference(x, scale, across_spatial, eps):
    """float64: y = scale * x / sqrt(sum x^2 + eps) per image or per position."""
    x = np.asarray(x, np.float64)
    if across_spatial:
        norm = np.sqrt((x ** 2).reshape(len(x), -1).sum(1) + eps).reshape((-1,) + (1,) * (x.ndim - 1))
    else:
        norm = np.sqrt((x ** 2).sum(1, keepdims=True) + eps)
    s = np.asarray(scale, np.float64)
    s = s if s.ndim == 0 else s.reshape((1, -1) + (1,) * (x.ndim - 2))
    return x / norm * s, norm


def normalize_backward_reference(x, scale, dy, across_spatial, eps):
    """SSD's Backward_cpu, written out per image in float64: the bottom diff is
    (dy - x * (x.dy) / n^2) / n, times the scale afterwards; the scale diff is sum(top*dy)/scale."""
    y, norm = normalize_reference(x, scale, across_spatial, eps)
    s = np.asarray(scale, np.float64)
    if s.ndim == 0:
        dscale = (y * dy).sum() / s
        per_channel = s
    else:
        dscale = np.moveaxis(y * dy, 1, 0).reshape(len(s), -1).sum(1) / s
        per_channel = s.reshape((1, -1) + (1,) * (x.ndim - 2))
    dx = np.empty_like(x, dtype=np.float64)
    for n in range(len(x)):
        if across_spatial:
            a = (x[n] * dy[n]).sum()
            dx[n] = (dy[n] - x[n] * a / norm[n] ** 2) / norm[n]
        else:
            a = (x[n] * dy[n]).sum(0, keepdims=True)
            dx[n] = (dy[n] - x[n] * a / norm[n] ** 2) / norm[n]
    return dx * per_channel, dscale


@pytest.mark.parametrize("across_spatial", [True, False])
@pytest.mark.parametrize("channel_shared", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (3, 4, 1, 1), (1, 6, 5)])
def test_normalize_forward_and_ssds_backward(across_spatial, channel_shared, shape):
    rng = np.random.RandomState(sum(shape) + 2 * across_spatial + channel_shared)
    text = (f'name: "n" type: "Normalize" norm_param {{ across_spatial: {str(across_spatial).lower()} '
            f'channel_shared: {str(channel_shared).lower()} eps: 0.001 '
            f'scale_filler {{ type: "gaussian" std: 3 }} }}')
    layer = build(text, [shape]).double()
    assert tuple(layer.scale.shape) == (() if channel_shared else (shape[1],))
    x = torch.tensor(rng.randn(*shape), requires_grad=True)
    y = layer(x)
    want, _ = normalize_reference(x.detach().numpy(), layer.scale.detach().numpy(), across_spatial, 0.001)
    assert_close(y, want, "Normalize forward")
    dy = rng.randn(*shape)
    y.backward(torch.tensor(dy))
    dx, dscale = normalize_backward_reference(x.detach().numpy(), layer.scale.detach().numpy(), dy,
                                              across_spatial, 0.001)
    assert_close(x.grad, dx, "Normalize bottom diff")
    assert_close(layer.scale.grad, dscale, "Normalize scale diff")
    if channel_shared:   # there SSD's backward is the derivative
        assert torch.autograd.gradcheck(lambda t: layer(t), (x.detach().requires_grad_(),))


def test_normalize_defaults_and_errors():
    layer = build('name: "n" type: "Normalize"', [(2, 3, 4, 4)])
    assert layer.across_spatial and layer.channel_shared and layer.eps == pytest.approx(1e-10)
    assert float(layer.scale.detach()) == 1.0
    x = torch.randn(2, 3, 4, 4)
    assert_close(layer(x), normalize_reference(x.numpy(), 1.0, True, 1e-10)[0], "defaults")
    with pytest.raises(LayerSetupError, match=r"n \(Normalize\): the bottom must have at least 2 axes"):
        build('name: "n" type: "Normalize"', [(5,)])
    with pytest.raises(LayerSetupError, match=r"norm_param.eps must be >= 0"):
        build('name: "n" type: "Normalize" norm_param { eps: -1 }', [(1, 2)])


# ------------------------------------------------------------------------------------------------
# Permute

@pytest.mark.parametrize("order, full", [([0, 2, 3, 1], (0, 2, 3, 1)), ([3, 1], (3, 1, 0, 2)),
                                         ([], (0, 1, 2, 3)), ([1, 0], (1, 0, 2, 3))])
def test_permute(order, full):
    layer = build('name: "p" type: "Permute" permute_param { ' +
                  " ".join(f"order: {o}" for o in order) + " }", [(2, 3, 4, 5)])
    assert layer.order == full
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert np.array_equal(layer(x).detach().numpy(), np.transpose(x.detach().numpy(), full))
    assert layer.output_shapes([(2, 3, 4, 5)]) == [tuple(np.empty((2, 3, 4, 5)).transpose(full).shape)]
    assert torch.autograd.gradcheck(layer, (x,))


def test_permute_errors():
    with pytest.raises(LayerSetupError, match=r"permute_param.order 4 is out of range for a 4-D"):
        build('name: "p" type: "Permute" permute_param { order: 0 order: 4 }', [(1, 2, 3, 4)])
    with pytest.raises(LayerSetupError, match=r"permute_param.order repeats an axis: \[1, 1\]"):
        build('name: "p" type: "Permute" permute_param { order: 1 order: 1 }', [(1, 2, 3, 4)])


# ------------------------------------------------------------------------------------------------
# PriorBox

def priorbox_reference(feature_hw, image_hw, min_sizes, max_sizes, ratios, flip, clip, variance,
                       step=None, offset=0.5):
    """SSD's PriorBox, cell by cell and prior by prior (float32 where SSD keeps floats)."""
    f32 = np.float32
    all_ratios = [1.0]
    for r in ratios:
        if any(abs(f32(r) - f32(a)) < 1e-6 for a in all_ratios):
            continue
        all_ratios.append(float(f32(r)))
        if flip:
            all_ratios.append(float(f32(1.0 / f32(r))))
    height, width = feature_hw
    image_h, image_w = image_hw
    step_h, step_w = step if step else (f32(image_h) / f32(height), f32(image_w) / f32(width))
    boxes = []
    for h in range(height):
        for w in range(width):
            cx = float((f32(w) + f32(offset)) * f32(step_w))
            cy = float((f32(h) + f32(offset)) * f32(step_h))
            for s, min_size in enumerate(min_sizes):
                sizes = [(int(min_size), int(min_size))]
                if max_sizes:
                    side = float(f32(math.sqrt(int(min_size) * int(max_sizes[s]))))
                    sizes.append((side, side))
                for r in all_ratios:
                    if abs(r - 1) < 1e-6:
                        continue
                    sizes.append((float(f32(int(min_size) * math.sqrt(r))),
                                  float(f32(int(min_size) / math.sqrt(r)))))
                for bw, bh in sizes:
                    boxes += [(cx - bw / 2) / image_w, (cy - bh / 2) / image_h,
                              (cx + bw / 2) / image_w, (cy + bh / 2) / image_h]
    boxes = np.float32(boxes)
    if clip:
        boxes = np.clip(boxes, 0, 1)
    variances = np.float32(list(variance) * (len(boxes) // 4) if len(variance) == 4
                           else [variance[0] if variance else 0.1] * len(boxes))
    return np.stack([boxes, variances])[None]


def test_priorbox_one_cell_by_hand():
    """One 1x1 cell of a 10x10 image: min 4, max 9, aspect ratio 2 without flip."""
    layer = build('name: "pb" type: "PriorBox" prior_box_param { min_size: 4 max_size: 9 '
                  'aspect_ratio: 2 flip: false }', [(1, 1, 1, 1), (1, 3, 10, 10)])
    top = layer(torch.zeros(1, 1, 1, 1), torch.zeros(1, 3, 10, 10))
    r = math.sqrt(2)
    boxes = [0.3, 0.3, 0.7, 0.7,                     # min size 4 around (5, 5)
             0.2, 0.2, 0.8, 0.8,                     # sqrt(4 * 9) = 6
             (5 - 2 * r) / 10, (5 - 2 / r) / 10, (5 + 2 * r) / 10, (5 + 2 / r) / 10]
    assert top.shape == (1, 2, 12)
    assert np.allclose(top[0, 0].numpy(), boxes, rtol=1e-6, atol=1e-7)
    assert np.allclose(top[0, 1].numpy(), 0.1)      # the default variance


PRIORBOX_CASES = [
    # text, feature (H, W), image (H, W), reference kwargs
    ('min_size: 30 max_size: 60 aspect_ratio: 2 flip: true clip: false variance: 0.1 '
     'variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5', (5, 7), (40, 56),
     dict(min_sizes=[30], max_sizes=[60], ratios=[2], flip=True, clip=False,
          variance=[0.1, 0.1, 0.2, 0.2], step=(8, 8))),
    # two min sizes (SSD truncates 7.9 to 7), ratios with a duplicate (0.5 is 1/2) and 3, clip
    ('min_size: 7.9 min_size: 12 max_size: 10 max_size: 20.5 aspect_ratio: 2 aspect_ratio: 0.5 '
     'aspect_ratio: 3 clip: true variance: 0.25', (3, 4), (33, 41),
     dict(min_sizes=[7.9, 12], max_sizes=[10, 20.5], ratios=[2, 0.5, 3], flip=True, clip=True,
          variance=[0.25])),
    # no flip, explicit image size and steps, offset 0: the second bottom's size is not used
    ('min_size: 5 aspect_ratio: 1 aspect_ratio: 2.5 flip: false img_h: 20 img_w: 30 step_h: 6 '
     'step_w: 5 offset: 0', (2, 3), (99, 99),
     dict(min_sizes=[5], max_sizes=[], ratios=[1, 2.5], flip=False, clip=False, variance=[],
          step=(6, 5), offset=0.0, image=(20, 30))),
    ('min_size: 16 img_size: 64', (4, 4), (7, 7),
     dict(min_sizes=[16], max_sizes=[], ratios=[], flip=True, clip=False, variance=[],
          image=(64, 64))),
]


@pytest.mark.parametrize("text, feature, image, kwargs", PRIORBOX_CASES)
def test_priorbox_geometry(text, feature, image, kwargs):
    layer = build(f'name: "pb" type: "PriorBox" prior_box_param {{ {text} }}',
                  [(2, 8) + feature, (2, 3) + image])
    top = layer(torch.randn((2, 8) + feature), torch.randn((2, 3) + image))
    kwargs = dict(kwargs)
    want = priorbox_reference(feature, kwargs.pop("image", image), **kwargs)
    assert top.shape == want.shape and layer.output_shapes([(2, 8) + feature, (2, 3) + image]) == [want.shape]
    assert top.dtype == torch.float32
    assert np.allclose(top.numpy(), want, rtol=1e-6, atol=1e-7)


def test_priorbox_gives_no_gradient_path_and_errors():
    layer = build('name: "pb" type: "PriorBox" prior_box_param { min_size: 4 }', [(1, 2, 3, 3), (1, 3, 9, 9)])
    feature = torch.randn(1, 2, 3, 3, requires_grad=True)
    assert not layer(feature, torch.randn(1, 3, 9, 9)).requires_grad   # the top is a constant
    errors = [
        ('', r"prior_box_param.min_size is required"),
        ('min_size: 10 max_size: 5', r"max_size 5 must be greater than its min_size 10"),
        ('min_size: 10 min_size: 12 max_size: 15', r"1 max_size for 2 min_size"),
        ('min_size: 4 variance: 0.1 variance: 0.2', r"variance takes 1 or 4 values, got 2"),
        ('min_size: 4 img_size: 30 img_h: 20 img_w: 20', r"either img_size or img_h/img_w"),
        ('min_size: 4 step: 8 step_h: 4', r"either step or step_h/step_w"),
        ('min_size: 4 step_h: 4', r"step_h and step_w must both be > 0"),
        ('min_size: -3', r"min_size must be > 0"),
    ]
    for params, pattern in errors:
        with pytest.raises(LayerSetupError, match=r"pb \(PriorBox\): .*" + pattern):
            build(f'name: "pb" type: "PriorBox" prior_box_param {{ {params} }}',
                  [(1, 2, 3, 3), (1, 3, 9, 9)])


# ------------------------------------------------------------------------------------------------
# DetectionOutput against a brute-force NMS

def decode_reference(loc, prior, variance, code_type, encoded):
    """One box, SSD's DecodeBBox in float32."""
    f = np.float32
    l = [f(v) for v in loc]
    p = [f(v) for v in prior]
    v = [f(1)] * 4 if encoded else [f(x) for x in variance]
    if code_type == "CORNER":
        return [p[i] + l[i] * v[i] for i in range(4)]
    pw, ph = p[2] - p[0], p[3] - p[1]
    if code_type == "CORNER_SIZE":
        return [p[0] + l[0] * v[0] * pw, p[1] + l[1] * v[1] * ph,
                p[2] + l[2] * v[2] * pw, p[3] + l[3] * v[3] * ph]
    cx, cy = v[0] * l[0] * pw + (p[0] + p[2]) / f(2), v[1] * l[1] * ph + (p[1] + p[3]) / f(2)
    w, h = np.exp(v[2] * l[2]) * pw, np.exp(v[3] * l[3]) * ph
    return [cx - w / f(2), cy - h / f(2), cx + w / f(2), cy + h / f(2)]


def overlap_reference(a, b):
    f = np.float32
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return f(0)

    def size(box):
        return f(0) if box[2] < box[0] or box[3] < box[1] else (box[2] - box[0]) * (box[3] - box[1])
    inter = (min(a[2], b[2]) - max(a[0], b[0])) * (min(a[3], b[3]) - max(a[1], b[1]))
    return inter / (size(a) + size(b) - inter)


def detection_reference(loc, conf, prior, num_classes, share, background, code_type, encoded,
                        threshold, nms_threshold, eta, top_k, keep_top_k):
    """Brute force: decode every box, then per image and class sort the candidates, and walk
    them one by one against every kept box."""
    num, priors = loc.shape[0], prior.shape[2] // 4
    loc_classes = 1 if share else num_classes
    loc = loc.reshape(num, priors, loc_classes, 4)
    conf = conf.reshape(num, priors, num_classes)
    boxes_p, vars_p = prior[0, 0].reshape(priors, 4), prior[0, 1].reshape(priors, 4)
    rows = []
    for i in range(num):
        kept = {}
        for c in range(num_classes):
            if c == background:
                continue
            lc = 0 if share else c
            boxes = [decode_reference(loc[i, p, lc], boxes_p[p], vars_p[p], code_type, encoded)
                     for p in range(priors)]
            scores = conf[i, :, c]
            candidates = sorted((p for p in range(priors) if scores[p] > np.float32(threshold)),
                                key=lambda p: (-scores[p], p))
            if top_k > -1:
                candidates = candidates[:top_k]
            adaptive = np.float32(nms_threshold)
            keep = []
            for p in candidates:
                if all(overlap_reference(boxes[p], boxes[k]) <= adaptive for k in keep):
                    keep.append(p)
                    if eta < 1 and adaptive > 0.5:
                        adaptive = np.float32(adaptive * np.float32(eta))
            kept[c] = [(p, boxes[p]) for p in keep]
        total = sum(len(v) for v in kept.values())
        if keep_top_k > -1 and total > keep_top_k:
            flat = sorted(((conf[i, p, c], c, p, box) for c, v in kept.items() for p, box in v),
                          key=lambda t: -t[0])[:keep_top_k]
            kept = {c: [(p, box) for s, cc, p, box in flat if cc == c] for c in kept}
        for c in sorted(kept):
            for p, box in kept[c]:
                rows.append([i, c, conf[i, p, c]] + list(box))
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(num)], np.float32).reshape(1, 1, num, 7)
    return np.array(rows, np.float32).reshape(1, 1, -1, 7)


def random_priors(rng, priors):
    centre = rng.uniform(0.1, 0.9, (priors, 2))
    size = rng.uniform(0.05, 0.4, (priors, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
    variances = np.tile([0.1, 0.1, 0.2, 0.2], (priors, 1))
    return np.stack([boxes.reshape(-1), variances.reshape(-1)])[None].astype(np.float32)


DETECTION_CASES = [
    # num_classes, share, background, code_type, encoded, threshold, nms, eta, top_k, keep_top_k
    (2, True, 0, "CENTER_SIZE", False, 0.01, 0.45, 1.0, 400, 200),
    (4, False, 0, "CENTER_SIZE", False, 0.2, 0.3, 1.0, -1, -1),
    (3, True, -1, "CORNER", False, None, 0.5, 1.0, 20, 15),
    (3, True, 1, "CORNER_SIZE", True, 0.3, 0.6, 0.8, -1, 7),       # adaptive NMS
    (5, False, 2, "CENTER_SIZE", True, 0.15, 0.4, 0.9, 10, -1),
    (2, True, 0, "CENTER_SIZE", False, 0.3, 0.45, 1.0, 0, -1),     # top_k 0 keeps nothing
]


@pytest.mark.parametrize("case", DETECTION_CASES, ids=lambda c: f"{c[3]}-share{c[1]}-bg{c[2]}")
def test_detection_output_matches_brute_force_nms(case):
    num_classes, share, background, code_type, encoded, threshold, nms_thr, eta, top_k, keep = case
    rng = np.random.RandomState(num_classes * 7 + top_k)
    num, priors = 3, 37
    loc_classes = 1 if share else num_classes
    loc = (rng.randn(num, priors * loc_classes * 4) * (0.05 if code_type != "CENTER_SIZE" else 1))
    loc = loc.astype(np.float32)
    logits = rng.randn(num, priors, num_classes) * 2
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    conf = conf.reshape(num, -1)
    prior = random_priors(rng, priors)
    params = (f"num_classes: {num_classes} share_location: {str(share).lower()} "
              f"background_label_id: {background} code_type: {code_type} "
              f"variance_encoded_in_target: {str(encoded).lower()} keep_top_k: {keep} "
              f"nms_param {{ nms_threshold: {nms_thr} eta: {eta} "
              + (f"top_k: {top_k} " if top_k != -1 else "") + "} "
              + (f"confidence_threshold: {threshold}" if threshold is not None else ""))
    layer = build(f'name: "det" type: "DetectionOutput" detection_output_param {{ {params} }}',
                  [loc.shape, conf.shape, prior.shape])
    got = layer(torch.from_numpy(loc), torch.from_numpy(conf), torch.from_numpy(prior))
    want = detection_reference(loc, conf, prior, num_classes, share, background, code_type,
                               encoded, -3.4028235e38 if threshold is None else threshold,
                               nms_thr, eta, top_k, keep)
    assert got.shape == want.shape
    assert np.array_equal(got[..., :2].numpy(), want[..., :2])        # images and labels
    assert np.array_equal(got[..., 2].numpy(), want[..., 2])          # scores are copied
    assert np.allclose(got[..., 3:].numpy(), want[..., 3:], rtol=1e-5, atol=1e-6)


def test_detection_output_with_nothing_found_gives_one_row_per_image():
    rng = np.random.RandomState(3)
    prior = random_priors(rng, 5)
    layer = build('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 2 '
                  'confidence_threshold: 0.99 }', [(3, 20), (3, 10), prior.shape])
    conf = torch.full((3, 10), 0.5)
    got = layer(torch.zeros(3, 20), conf, torch.from_numpy(prior))
    assert got.shape == (1, 1, 3, 7)
    assert got[0, 0].tolist() == [[i, -1, -1, -1, -1, -1, -1] for i in range(3)]


def test_nms_equal_scores_keep_prior_order_and_eta_lowers_the_threshold():
    boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0.6], [0, 0.5, 1, 1.5], [0, 0, 1, 1.05]],
                         dtype=torch.float32)
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9])
    # box 3 first; box 0 overlaps it by 1/1.05 = 0.952; box 1 by 0.6/1.05 = 0.571 (and box 0 by
    # 0.6); box 2 by 0.55/1.5 = 0.367 (and box 0 by 0.333); the equal scores go in prior order
    assert nms(boxes, scores, 0.0, 0.9, 1.0, -1).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.0, 0.96, 1.0, -1).tolist() == [3, 0, 1, 2]
    assert nms(boxes, scores, 0.55, 0.96, 1.0, -1).tolist() == [3]
    assert nms(boxes, scores, 0.0, 0.96, 1.0, 2).tolist() == [3, 0]
    # eta 0.5: after keeping box 3 the threshold is 0.48, then box 1 (0.571) is dropped
    assert nms(boxes, scores, 0.0, 0.96, 0.5, -1).tolist() == [3, 2]


def test_detection_output_errors_and_no_backward():
    shapes = [(1, 16), (1, 8), (1, 2, 16)]
    errors = [
        ('', r"detection_output_param.num_classes is required"),
        ('num_classes: 2 nms_param { eta: 1.5 }', r"nms_param.eta must be in \(0, 1\]"),
        ('num_classes: 2 nms_param { nms_threshold: -0.1 }', r"nms_threshold must be >= 0"),
        ('num_classes: 3', r"bottom 1 \('b1'\) has shape \(1, 8\); 4 priors need \(N, 12\) confidences"),
        ('num_classes: 2 share_location: false', r"bottom 0 \('b0'\) has shape \(1, 16\); 4 priors "
                                                 r"need \(N, 32\) location values"),
        ('num_classes: 2 keep_top_k: -2', r"keep_top_k must be >= -1"),
    ]
    for params, pattern in errors:
        with pytest.raises(LayerSetupError, match=r"det \(DetectionOutput\): .*" + pattern):
            build(f'name: "det" type: "DetectionOutput" detection_output_param {{ {params} }}', shapes)
    with pytest.raises(LayerSetupError, match=r"bottom 2 \(priors\) must have shape \(1, 2, P\*4\)"):
        build('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 2 }',
              [(1, 16), (1, 8), (1, 16)])
    with pytest.warns(UserWarning, match=r"det \(DetectionOutput\): save_output_param: detection "
                      r"files are not written"):
        build('name: "det" type: "DetectionOutput" detection_output_param { num_classes: 2 '
              'save_output_param { output_directory: "/tmp/x" } }', shapes)
    net = sc.Net("""
        layer { name: "in" type: "Input" top: "loc" top: "conf" top: "prior"
                input_param { shape { dim: 1 dim: 16 } shape { dim: 1 dim: 8 } shape { dim: 1 dim: 2 dim: 16 } } }
        layer { name: "scale" type: "Scale" bottom: "loc" top: "scaled" param { lr_mult: 1 } }
        layer { name: "det" type: "DetectionOutput" bottom: "scaled" bottom: "conf" bottom: "prior"
                top: "det" detection_output_param { num_classes: 2 } }""")
    prior = torch.from_numpy(random_priors(np.random.RandomState(0), 4))
    out = net.forward(loc=torch.randn(1, 16), conf=torch.rand(1, 8), prior=prior)
    with pytest.raises(NoBackwardError, match=r"det \(DetectionOutput\) has no backward"):
        out["det"].sum().backward()


# ------------------------------------------------------------------------------------------------
# a res10-style SSD face detector against OpenCV's Caffe importer

def res10_prototxt(width=8, image=300, batch=2):
    """OpenCV's res10_300x300 face detector layout (BatchNorm/Scale/ReLU ResNet-10 blocks,
    Normalize on the stride-8 features, six heads of loc/conf convolutions with Permute and
    Flatten, a PriorBox each, Concat, Softmax through Reshape, DetectionOutput), with
    `width` channels in the first block instead of 32."""
    lines = [f'name: "res10_style"',
             f'layer {{ name: "input" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} '
             f'dim: 3 dim: {image} dim: {image} }} }} }}']

    def add(text):
        lines.append("layer { " + text + " }")

    def conv(name, bottom, out, kernel, stride=1, pad=0, dilation=1, bias=True, top=None):
        top = top or name
        add(f'name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" '
            f'convolution_param {{ num_output: {out} kernel_size: {kernel} stride: {stride} '
            f'pad: {pad} dilation: {dilation} bias_term: {str(bias).lower()} '
            f'weight_filler {{ type: "msra" }} bias_filler {{ type: "constant" value: 0 }} }}')
        return top

    def bn_scale_relu(prefix, blob, relu=True):
        add(f'name: "{prefix}_bn" type: "BatchNorm" bottom: "{blob}" top: "{prefix}_bn"')
        add(f'name: "{prefix}_scale" type: "Scale" bottom: "{prefix}_bn" top: "{prefix}_bn" '
            f'scale_param {{ bias_term: true }}')
        if relu:
            add(f'name: "{prefix}_relu" type: "ReLU" bottom: "{prefix}_bn" top: "{prefix}_bn"')
        return f"{prefix}_bn"

    add('name: "data_bn" type: "BatchNorm" bottom: "data" top: "data_bn"')
    add('name: "data_scale" type: "Scale" bottom: "data_bn" top: "data_bn" scale_param { bias_term: true }')
    x = conv("conv1_h", "data_bn", width, 7, 2, 3)
    x = bn_scale_relu("conv1", x)
    add(f'name: "conv1_pool" type: "Pooling" bottom: "{x}" top: "conv1_pool" '
        f'pooling_param {{ kernel_size: 3 stride: 2 }}')
    x = "conv1_pool"
    # layer_64_1: identity shortcut
    y = conv("layer_64_1_conv1_h", x, width, 3, 1, 1, bias=False)
    y = bn_scale_relu("layer_64_1_2", y)
    y = conv("layer_64_1_conv2_h", y, width, 3, 1, 1, bias=False)
    add(f'name: "layer_64_1_sum" type: "Eltwise" bottom: "{y}" bottom: "{x}" top: "layer_64_1_sum"')
    x = "layer_64_1_sum"
    features = {}
    for label, depth, stride, dilation in ((128, 2 * width, 2, 1), (256, 4 * width, 2, 1),
                                           (512, 8 * width, 1, 2)):
        name = f"layer_{label}_1"
        pre = bn_scale_relu(f"{name}_1", x)
        if depth == 4 * width:
            features["conv4_3"] = pre            # res10 normalises the block's input here
        y = conv(f"{name}_conv1_h", pre, depth, 3, stride, dilation, dilation, bias=False)
        y = bn_scale_relu(f"{name}_2", y)
        y = conv(f"{name}_conv2_h", y, depth, 3, 1, dilation, dilation, bias=False)
        shortcut = conv(f"{name}_conv_expand_h", pre, depth, 1, stride, bias=False)
        add(f'name: "{name}_sum" type: "Eltwise" bottom: "{y}" bottom: "{shortcut}" top: "{name}_sum"')
        x = f"{name}_sum"
    features["fc7"] = bn_scale_relu("last", x)
    x = features["fc7"]
    for index, (depth, pad) in enumerate(((2 * width, 1), (width, 1), (width, 0), (width, 0)), 6):
        y = conv(f"conv{index}_1_h", x, depth // 2, 1)
        add(f'name: "conv{index}_1_relu" type: "ReLU" bottom: "{y}" top: "{y}"')
        y = conv(f"conv{index}_2_h", y, depth, 3, 2 if index < 8 else 1, pad)
        add(f'name: "conv{index}_2_relu" type: "ReLU" bottom: "{y}" top: "{y}"')
        features[f"conv{index}_2"] = x = y
    add(f'name: "conv4_3_norm" type: "Normalize" bottom: "{features["conv4_3"]}" top: "conv4_3_norm" '
        f'norm_param {{ across_spatial: false scale_filler {{ type: "constant" value: 20 }} '
        f'channel_shared: false }}')
    features["conv4_3"] = "conv4_3_norm"
    heads = [("conv4_3", 30, 60, [2], 8), ("fc7", 60, 111, [2, 3], 16),
             ("conv6_2", 111, 162, [2, 3], 32), ("conv7_2", 162, 213, [2, 3], 64),
             ("conv8_2", 213, 264, [2], 100), ("conv9_2", 264, 315, [2], 300)]
    locs, confs, priors = [], [], []
    for head, low, high, ratios, step in heads:
        blob = features[head]
        per_cell = 2 + 2 * len(ratios)
        for kind, per_prior, out in (("loc", 4, locs), ("conf", 2, confs)):
            name = f"{head}_mbox_{kind}"
            conv(name, blob, per_cell * per_prior, 3, 1, 1)
            add(f'name: "{name}_perm" type: "Permute" bottom: "{name}" top: "{name}_perm" '
                f'permute_param {{ order: 0 order: 2 order: 3 order: 1 }}')
            add(f'name: "{name}_flat" type: "Flatten" bottom: "{name}_perm" top: "{name}_flat" '
                f'flatten_param {{ axis: 1 }}')
            out.append(f"{name}_flat")
        ratio_text = " ".join(f"aspect_ratio: {r}" for r in ratios)
        add(f'name: "{head}_mbox_priorbox" type: "PriorBox" bottom: "{blob}" bottom: "data" '
            f'top: "{head}_mbox_priorbox" prior_box_param {{ min_size: {low} max_size: {high} '
            f'{ratio_text} flip: true clip: false variance: 0.1 variance: 0.1 variance: 0.2 '
            f'variance: 0.2 step: {step} offset: 0.5 }}')
        priors.append(f"{head}_mbox_priorbox")
    for name, blobs, axis in (("mbox_loc", locs, 1), ("mbox_conf", confs, 1),
                              ("mbox_priorbox", priors, 2)):
        add(f'name: "{name}" type: "Concat" ' + " ".join(f'bottom: "{b}"' for b in blobs) +
            f' top: "{name}" concat_param {{ axis: {axis} }}')
    add('name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "mbox_conf_reshape" '
        'reshape_param { shape { dim: 0 dim: -1 dim: 2 } }')
    add('name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape" '
        'top: "mbox_conf_softmax" softmax_param { axis: 2 }')
    add('name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax" '
        'top: "mbox_conf_flatten" flatten_param { axis: 1 }')
    add('name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "mbox_conf_flatten" '
        'bottom: "mbox_priorbox" top: "detection_out" include { phase: TEST } '
        'detection_output_param { num_classes: 2 share_location: true background_label_id: 0 '
        'nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE keep_top_k: 200 '
        'confidence_threshold: 0.01 }')
    return "\n".join(lines) + "\n"


def _randomise(net, seed):
    """Weights that keep activations of order 1: BatchNorm statistics from a standard normal
    input, scales near 1 (the default fillers would leave mean/variance zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for record in net.records:
            blobs = record.module.caffe_blobs()
            if record.type == "BatchNorm":
                blobs[0].normal_(0, 0.1, generator=generator)
                blobs[1].uniform_(0.5, 2.0, generator=generator)
                blobs[2].fill_(1.0)
            elif record.type == "Scale":
                blobs[0].uniform_(0.5, 1.5, generator=generator)
                blobs[1].normal_(0, 0.1, generator=generator)
            elif record.type == "Convolution":
                weight = blobs[0]
                fan_in = weight[0].numel()
                # the heads get small weights: confidences well inside (0, 1), so that no two
                # scores tie (the order of equal scores is left open by the original)
                gain = 0.05 if "_mbox_" in record.name else 1.0
                weight.normal_(0, gain * math.sqrt(2.0 / fan_in), generator=generator)
                if len(blobs) > 1:
                    blobs[1].normal_(0, 0.1, generator=generator)
            elif record.type == "Normalize":
                blobs[0].uniform_(10, 30, generator=generator)


def test_res10_style_ssd_matches_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the `test` extra) reads the "
                              "SSD net for comparison")
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(res10_prototxt())
    net = sc.Net(prototxt)
    _randomise(net, seed=0)
    weights = tmp_path / "res10_style.caffemodel"
    from segaware_caffe.caffe_proto import write_weights
    write_weights(net.to_weights_proto(), weights, dialect="ssd")   # SSD's field numbers
    images = np.random.RandomState(1).uniform(-1, 1, (2, 3, 300, 300)).astype(np.float32)

    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    cv_net.enableFusion(False)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setInput(images)
    names = [n for n in cv_net.getLayerNames() if n != "input" and not n.startswith("_")]
    cv_out = dict(zip(names, cv_net.forward(names)))

    wanted = []
    for record in net.records:
        if record.type != "Input" and record.name in cv_out:
            wanted.append(f"{record.tops[0]}@{record.name}")
    ours = net.forward(outputs=wanted, data=torch.from_numpy(images))
    worst = 0.0
    checked = 0
    for key in wanted:
        layer = key.split("@")[1]
        if layer == "detection_out":
            continue
        got = ours[key].detach().numpy()
        want = cv_out[layer].reshape(got.shape)
        assert_close(got, want, key)      # 1e-4 relative (+ 1e-5 of the blob's range)
        worst = max(worst, np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
        checked += 1
    assert checked >= 90, checked
    print(f"{checked} intermediate blobs agree with OpenCV, worst {worst:.2g} of the blob range")
    got = ours["detection_out@detection_out"].detach().numpy()
    want = cv_out["detection_out"]
    assert got.shape == want.shape and got.shape[2] >= 100, (got.shape, want.shape)
    assert np.array_equal(got[..., :2], want[..., :2])                   # image, label per row
    assert np.allclose(got[..., 2:], want[..., 2:], rtol=1e-4, atol=1e-5)
    # and the SSD-numbered caffemodel loads back into our net unchanged
    again = sc.Net(prototxt, weights=weights)
    for name, params in net.params.items():
        for mine, loaded in zip(params, again.params[name]):
            assert torch.equal(mine.detach(), loaded.detach()), name
