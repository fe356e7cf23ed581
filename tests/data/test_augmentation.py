"""Augmentation (FlowNet translation): a loop reference written from the definition at other shapes
(H != W, negative and zero shifts, batch > 1), the random draw, and the refused variants."""
import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.errors import NoBackwardError


def net_text(shape, aug, image_channels=3, flow_channels=2, extra_layers="", force=False):
    n, h, w = shape
    dims = lambda c: f"dim: {n} dim: {c} dim: {h} dim: {w}"   # noqa: E731
    return (f'name: "aug" {"force_backward: true" if force else ""} '
            f'input: "im0" input_shape {{ {dims(image_channels)} }} '
            f'input: "im1" input_shape {{ {dims(image_channels)} }} '
            f'input: "flo" input_shape {{ {dims(flow_channels)} }} {extra_layers} '
            f'layer {{ name: "aug" type: "Augmentation" bottom: "im0" bottom: "im1" bottom: "flo" '
            f'top: "a0" top: "a1" top: "aflo" top: "mask" aug_param {{ {aug} }} }}')


def reference(img, flow, shift):
    """Pixel loops: out[y, x] = in[y + s, x + s] where that is inside, else 0; flow u filled with 1
    there, then u *= W / (W - |s|), v *= H / (H - |s|) (float32); mask 1 where filled."""
    _, height, width = img.shape
    out = np.zeros_like(img)
    out_flow = np.zeros_like(flow)
    mask = np.zeros((1, height, width), np.float32)
    fu = np.float32(width) / np.float32(width - abs(shift))
    fv = np.float32(height) / np.float32(height - abs(shift))
    for y in range(height):
        for x in range(width):
            sy, sx = y + shift, x + shift
            if 0 <= sy < height and 0 <= sx < width:
                out[:, y, x] = img[:, sy, sx]
                u, v = flow[0, sy, sx], flow[1, sy, sx]
            else:
                u, v = np.float32(1), np.float32(0)
                mask[0, y, x] = 1
            out_flow[0, y, x] = np.float32(u) * fu
            out_flow[1, y, x] = np.float32(v) * fv
    return out, out_flow, mask


def inputs(shape, seed=0):
    n, h, w = shape
    rng = np.random.default_rng(seed)
    return (rng.random((n, 3, h, w), dtype=np.float32), rng.random((n, 3, h, w), dtype=np.float32),
            (rng.standard_normal((n, 2, h, w)) * 3).astype(np.float32))


@pytest.mark.parametrize("shape, t, shift", [
    ((3, 7, 11), 0.2, 2),        # int(0.2 * 11) = 2: the width sets the vertical shift too
    ((2, 9, 6), -0.3, -1),       # int(-1.8) truncates toward zero
    ((1, 8, 8), -0.25, -2),
    ((2, 5, 10), 0.0, 0),
    ((1, 6, 13), 0.3, 3),        # 0.3f * 13 = 3.9000001
])
def test_translation_matches_the_definition(shape, t, shift):
    net = sc.Net(net_text(shape, f"num_transformations: 1 min_translation: {t} max_translation: {t}"))
    im0, im1, flo = inputs(shape)
    out = net.forward(im0=im0, im1=im1, flo=flo)
    for j in range(shape[0]):
        a0, f, m = reference(im0[j], flo[j], shift)
        a1, _, _ = reference(im1[j], flo[j], shift)
        np.testing.assert_array_equal(out["a0"][j].numpy(), a0)
        np.testing.assert_array_equal(out["a1"][j].numpy(), a1)
        np.testing.assert_array_equal(out["aflo"][j].numpy(), f)
        np.testing.assert_array_equal(out["mask"][j].numpy(), m)


def test_random_translation_per_item_within_range_and_seeded():
    shape = (6, 10, 10)
    text = net_text(shape, "num_transformations: 1 min_translation: -0.3 max_translation: 0.3")
    im0, im1, flo = inputs(shape)

    def run():
        torch.manual_seed(11)
        net = sc.Net(text)
        return [net.forward(im0=im0, im1=im1, flo=flo) for _ in range(3)]

    shifts = set()
    for out in run():
        for j in range(shape[0]):
            matches = [s for s in range(-3, 4)
                       if np.array_equal(out["a0"][j].numpy(), reference(im0[j], flo[j], s)[0])
                       and np.array_equal(out["aflo"][j].numpy(), reference(im0[j], flo[j], s)[1])]
            assert matches, "each item is translated by one shift of the range"
            shifts.add(matches[0])
    assert len(shifts) >= 3
    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a["a0"].numpy(), b["a0"].numpy())


def test_rotation_and_scaling_are_no_ops_with_a_warning():
    shape = (2, 6, 6)
    im0, im1, flo = inputs(shape)
    one = sc.Net(net_text(shape, "num_transformations: 1 min_translation: 0.2 max_translation: 0.2"))
    with pytest.warns(UserWarning, match="rotation.*scaling.*do nothing"):
        three = sc.Net(net_text(shape, "num_transformations: 3 min_translation: 0.2 "
                                       "max_translation: 0.2 max_rotation: 30 min_scaling: 1.5"))
    a, b = one.forward(im0=im0, im1=im1, flo=flo), three.forward(im0=im0, im1=im1, flo=flo)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


def test_no_transformation_leaves_the_tops_zero():
    shape = (1, 4, 4)
    with pytest.warns(UserWarning, match="writes none of the tops"):
        net = sc.Net(net_text(shape, "num_transformations: 0"))
    out = net.forward(**dict(zip(("im0", "im1", "flo"), inputs(shape))))
    assert all(not t.any() for t in out.values())
    assert out["mask"].shape == (1, 1, 4, 4)


def test_flow_nan_gives_nan_mask_as_the_original():
    shape = (1, 4, 5)
    net = sc.Net(net_text(shape, "num_transformations: 1 min_translation: 0.2 max_translation: 0.2"))
    im0, im1, flo = inputs(shape)
    flo[0, 0, 2, 2] = np.nan                  # moves to (1, 1) with shift 1
    mask = net.forward(im0=im0, im1=im1, flo=flo)["mask"].numpy()
    assert np.isnan(mask[0, 0, 1, 1]) and np.isnan(mask).sum() == 1


@pytest.mark.parametrize("aug, kwargs, message", [
    ("num_transformations: 4", {}, r"num_transformations 4 includes transformation 4 \(gaussian "
                                   r"noise, aug_param.min_gaussian/max_gaussian\)"),
    ("num_transformations: 2", {}, r"allows a shift of 2 pixels"),      # defaults: -0.2 .. 0.2 of 10
    ("num_transformations: 1 min_translation: 0.5 max_translation: 0.6", {"shape": (1, 5, 12)},
     r"shift of 7 pixels .* must stay below 5"),
    ("num_transformations: 1", {"image_channels": 1}, r"bottom 0 \('im0'\) must be an \(N, 3, H, W\)"),
    ("num_transformations: 1", {"flow_channels": 3}, r"bottom 2 \('flo'\) must be a flow field"),
])
def test_refused_settings_name_the_field(aug, kwargs, message):
    shape = kwargs.pop("shape", (1, 2, 10))
    with pytest.raises(sc.NetBuildError, match=message):
        sc.Net(net_text(shape, aug, **kwargs))


def test_no_gradient_flows_through_it():
    shape = (1, 6, 6)
    pre = ('layer { name: "pre" type: "Scale" bottom: "im0" top: "im0s" '
           'scale_param { filler { type: "constant" value: 1 } } }')
    text = net_text(shape, "num_transformations: 1 min_translation: 0.2 max_translation: 0.2",
                    extra_layers=pre).replace('bottom: "im0" bottom: "im1"', 'bottom: "im0s" bottom: "im1"')
    net = sc.Net(text)
    out = net.forward(**dict(zip(("im0", "im1", "flo"), inputs(shape))))
    with pytest.raises(NoBackwardError, match=r"aug \(Augmentation\) has no backward"):
        out["a0"].sum().backward()
