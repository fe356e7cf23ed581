"""WindowData: window files, the crop geometry (warp, context padding with clipping, square, mirror)
against hand-computed boxes, batch composition, the seeded draw, mean/scale, and errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import segaware_caffe as sc
from segaware_caffe.data import DataError, WORKERS_ENV
from segaware_caffe.data.images import cv_resize_linear_u8
from segaware_caffe.data.windows import Window, WindowCrop

MEAN = np.float32([90, 100, 110])


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "0")


@pytest.fixture
def image(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    Image.fromarray(rgb).save(tmp_path / "img" / "a.png")
    Image.fromarray(rgb[::-1].copy()).save(tmp_path / "img" / "b.png")
    return {"a": rgb[:, :, ::-1].copy(), "b": rgb[::-1, :, ::-1].copy()}     # BGR


def window_file(tmp_path, blocks):
    """blocks: [(index, path, [(label, overlap, x1, y1, x2, y2), ...])]"""
    text = []
    for index, path, windows in blocks:
        text += [f"# {index}", path, "3", "20", "24", str(len(windows))]
        text += [" ".join(str(v) for v in w) for w in windows]
    (tmp_path / "windows.txt").write_text("\n".join(text) + "\n")


def net(tmp_path, batch=4, param="", transform="crop_size: 6", **kwargs):
    path = tmp_path / "net.prototxt"
    path.write_text(f'name: "w" layer {{ name: "win" type: "WindowData" top: "data" top: "label" '
                    f'window_data_param {{ source: "windows.txt" root_folder: "img/" '
                    f'batch_size: {batch} {param} }} transform_param {{ {transform} }} }}')
    return sc.Net(path, **kwargs)


def warp(image, x1, y1, x2, y2, size, mean=MEAN, scale=1.0):
    crop = cv_resize_linear_u8(image[y1:y2 + 1, x1:x2 + 1], size, size)
    return (crop.transpose(2, 0, 1).astype(np.float32) - mean[:, None, None]) * np.float32(scale)


def test_warp_batch_order_labels_mean_and_scale(tmp_path, image):
    window_file(tmp_path, [(0, "a.png", [(2, 0.9, 1, 2, 9, 8), (0, 0.1, 0, 0, 6, 5)])])
    out = net(tmp_path, batch=5, param="fg_fraction: 0.5 scale: 0.5",
              transform="crop_size: 6 mean_value: 90 mean_value: 100 mean_value: 110").forward()
    # int(5 * 0.5) = 2 foreground items, after the 3 background ones
    np.testing.assert_array_equal(out["label"].numpy(), [0, 0, 0, 2, 2])
    bg = warp(image["a"], 0, 0, 6, 5, 6, scale=0.5)
    fg = warp(image["a"], 1, 2, 9, 8, 6, scale=0.5)
    np.testing.assert_array_equal(out["data"].numpy(), np.stack([bg, bg, bg, fg, fg]))


def test_thresholds_sort_and_drop_windows(tmp_path, image):
    window_file(tmp_path, [(0, "a.png", [(3, 0.7, 0, 0, 5, 5), (1, 0.55, 2, 2, 8, 8),
                                        (4, 0.3, 1, 1, 9, 9), (5, 0.05, 3, 3, 7, 7)])])
    layer = net(tmp_path, param="fg_threshold: 0.6 bg_threshold: 0.2").layers["win"]
    assert layer.counts == (1, 1)      # 0.55 and 0.3 fall between the thresholds


def test_draw_is_uniform_over_windows_and_follows_torch_seed(tmp_path, image):
    fg = [(1, 0.9, 0, 0, 7, 7), (2, 0.8, 5, 3, 15, 12), (3, 0.6, 10, 8, 22, 19)]
    window_file(tmp_path, [(0, "a.png", fg[:2] + [(0, 0.0, 0, 0, 3, 3)]),
                           (1, "b.png", fg[2:])])

    def labels():
        torch.manual_seed(5)
        n = net(tmp_path, batch=8, param="fg_fraction: 1")
        return np.concatenate([n.forward()["label"].numpy() for _ in range(4)])

    drawn = labels()
    assert set(drawn.tolist()) == {1, 2, 3}
    np.testing.assert_array_equal(drawn, labels())
    # the third window lies in the second image block
    torch.manual_seed(5)
    out = net(tmp_path, batch=8, param="fg_fraction: 1").forward()
    for item, label in zip(out["data"].numpy(), out["label"].numpy()):
        _, x1, y1, x2, y2 = [(w[0],) + w[2:] for w in fg if w[0] == label][0]
        source = image["b"] if label == 3 else image["a"]
        np.testing.assert_array_equal(item, warp(source, x1, y1, x2, y2, 6, mean=np.zeros(3, np.float32)))


def test_mirror_flips_some_items(tmp_path, image):
    window_file(tmp_path, [(0, "a.png", [(1, 0.9, 2, 3, 12, 9)])])
    torch.manual_seed(0)
    out = net(tmp_path, batch=8, param="fg_fraction: 1", transform="crop_size: 6 mirror: true").forward()
    plain = warp(image["a"], 2, 3, 12, 9, 6, mean=np.zeros(3, np.float32))
    flips = [0 if np.array_equal(item, plain) else 1 for item in out["data"].numpy()]
    for item, flip in zip(out["data"].numpy(), flips):
        if flip:
            np.testing.assert_array_equal(item, plain[:, :, ::-1])
    assert set(flips) == {0, 1}


def crop(**kwargs):
    settings = dict(crop_size=8, context_pad=2, square=False, scale=1.0, mean_values=(),
                    mean_image=None)
    settings.update(kwargs)
    return WindowCrop(**settings)


def test_context_pad_inside_the_image():
    # crop 8, pad 2: scale 8 / 4 = 2; the 4x4 box (4, 3)-(7, 6) has centre (6, 5), half 2 ->
    # (2, 1)-(10, 9), 9x9, warped to round(9 * 8 / 9) = 8
    geometry = crop().geometry(Window(0, 1, 4, 3, 7, 6, 1), rows=20, cols=24, mirror=False)
    assert geometry == ((2, 1, 10, 9), (8, 8), (0, 0))


def test_context_pad_clipped_at_the_image_corner_and_mirrored():
    # box (0, 0)-(3, 3): centre (2, 2), half 4 -> (-2, -2)-(6, 6), 9 unclipped; clipped to
    # (0, 0)-(6, 6), 7 wide: warped round(7 * 8/9) = 6; padding round(2 * 8/9) = 2 on the
    # top/left, 0 on the right, so a mirrored item has it on the other side
    window = Window(0, 1, 0, 0, 3, 3, 1)
    assert crop().geometry(window, 20, 24, False) == ((0, 0, 6, 6), (6, 6), (2, 2))
    assert crop().geometry(window, 20, 24, True) == ((0, 0, 6, 6), (6, 6), (2, 0))
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    item = crop()(image, window, False, "test")
    want = np.zeros((3, 8, 8), np.float32)
    want[:, 2:, 2:] = cv_resize_linear_u8(image[0:7, 0:7], 6, 6).transpose(2, 0, 1)
    np.testing.assert_array_equal(item, want)
    mirrored = crop()(image, window, True, "test")
    want = np.zeros((3, 8, 8), np.float32)
    want[:, 2:, :6] = cv_resize_linear_u8(image[0:7, 0:7], 6, 6)[:, ::-1].transpose(2, 0, 1)
    np.testing.assert_array_equal(mirrored, want)


def test_square_mode_makes_the_box_square():
    # a 2-wide, 6-tall box (5, 4)-(6, 9): half height 3 wins; no context pad (scale 1):
    # centre (6, 7) -> (3, 4)-(9, 10), 7x7
    geometry = crop(context_pad=0, square=True).geometry(Window(0, 1, 5, 4, 6, 9, 1), 20, 24, False)
    assert geometry == ((3, 4, 9, 10), (8, 8), (0, 0))


def test_mean_file_offsets_use_the_width(tmp_path, image):
    from segaware_caffe import caffe_proto
    mean = np.random.default_rng(3).uniform(0, 255, (1, 3, 11, 10)).astype(np.float32)
    caffe_proto.write_blob(mean, tmp_path / "mean.binaryproto")
    window_file(tmp_path, [(0, "a.png", [(1, 0.9, 2, 3, 12, 9)])])
    out = net(tmp_path, batch=1, param="fg_fraction: 1",
              transform='crop_size: 6 mean_file: "mean.binaryproto"').forward()
    offset = (10 - 6) // 2                   # from the width, for rows and columns alike
    raw = warp(image["a"], 2, 3, 12, 9, 6, mean=np.zeros(3, np.float32))
    np.testing.assert_array_equal(out["data"].numpy()[0],
                                  raw - mean[0, :, offset:offset + 6, offset:offset + 6])


def test_worker_process_gives_the_same_batches(tmp_path, image, monkeypatch):
    window_file(tmp_path, [(0, "a.png", [(1, 0.9, 0, 0, 7, 7), (2, 0.9, 5, 5, 12, 12),
                                        (0, 0.0, 0, 0, 3, 3)])])
    torch.manual_seed(2)
    here = net(tmp_path, batch=6).forward()
    monkeypatch.setenv(WORKERS_ENV, "1")
    torch.manual_seed(2)
    layer_net = net(tmp_path, batch=6)
    there = layer_net.forward()
    layer_net.layers["win"].close()
    for k in here:
        np.testing.assert_array_equal(here[k].numpy(), there[k].numpy())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("text, message", [
    ("", "window file .* is empty"),
    ("% 0\na.png\n3 20 24\n0\n", r"line 1: expected '#' starting an image block, got '%'"),
    ("# 0\na.png\n3 20 24\n2\n1 0.9 0 0 5 5\n", "ends early: expected a window's label"),
    ("# 0\na.png\n3 20 24\n1\n1 high 0 0 5 5\n", r"line 5: expected a window's overlap \(a number\), got 'high'"),
    ("# 0\na.png\n3 20 24\n1\n0 0.9 0 0 5 5\n", r"line 5: a foreground window .* label > 0, got 0"),
    ("# 3\na.png\n3 20 24\n1\n1 0.9 0 0 5 5\n", r"image block '# 3'.*the file has 1 image"),
    ("# 0\na.png\n1 20 24\n1\n1 0.9 0 0 5 5\n# 1\na.png\n3 20 24\n1\n0 0.1 0 0 5 5\n",
     None),
    ("# 0\na.png\n3 20 24\n1\n0 0.1 0 0 5 5\n", "no foreground window"),
    ("# 0\na.png\n1 20 24\n2\n1 0.9 0 0 5 5\n0 0.1 0 0 5 5\n", "gives 1 channels"),
])
def test_window_file_errors(tmp_path, image, text, message):
    (tmp_path / "windows.txt").write_text(text)
    if message is None:     # the channels of the last block count: 3 here
        net(tmp_path)
        return
    with pytest.raises(sc.NetBuildError, match=message):
        net(tmp_path)


@pytest.mark.parametrize("param, transform, message", [
    ("", "", "crop_size must be > 0"),
    ("fg_fraction: 1.5", "crop_size: 6", r"fg_fraction must be in \[0, 1\]"),
    ("context_pad: 3", "crop_size: 6", "context_pad 3 leaves nothing"),
    ("", "crop_size: 6 mean_value: 1 mean_value: 2", "give 1 or 3"),
])
def test_setting_errors(tmp_path, image, param, transform, message):
    window_file(tmp_path, [(0, "a.png", [(1, 0.9, 0, 0, 5, 5), (0, 0.1, 0, 0, 5, 5)])])
    with pytest.raises(sc.NetBuildError, match=message):
        net(tmp_path, param=param, transform=transform)


def test_window_outside_the_image_without_context(tmp_path, image):
    window_file(tmp_path, [(0, "a.png", [(1, 0.9, 20, 15, 30, 19)])])
    with pytest.raises(DataError, match=r"windows\.txt, line 7 .*not inside the 20x24 image"):
        net(tmp_path, batch=1, param="fg_fraction: 1").forward()


def test_missing_image_is_reported_when_read(tmp_path, image):
    window_file(tmp_path, [(0, "missing.png", [(1, 0.9, 0, 0, 5, 5)])])
    layer_net = net(tmp_path, batch=1, param="fg_fraction: 1")
    with pytest.raises(DataError, match=r"missing\.png\): cannot read the image"):
        layer_net.forward()


def test_unknown_crop_mode_warns_and_warps(tmp_path, image):
    window_file(tmp_path, [(0, "a.png", [(1, 0.9, 1, 2, 9, 8)])])
    with pytest.warns(UserWarning, match="crop_mode 'stretch' is neither"):
        out = net(tmp_path, batch=1, param='fg_fraction: 1 crop_mode: "stretch"').forward()
    np.testing.assert_array_equal(out["data"].numpy()[0],
                                  warp(image["a"], 1, 2, 9, 8, 6, mean=np.zeros(3, np.float32)))
