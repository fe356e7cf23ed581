"""ImageSegData, TwoImageData and ImageData on a generated 6-image dataset: exact values of
crop/pad/mirror/mean/scale, TRAIN randomness, epoch order, shuffle, errors."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from segaware_caffe import caffe_proto
from segaware_caffe import BuildContext, NetBuildError
from segaware_caffe.data import DataError, WORKERS_ENV, resize_bilinear, resize_nearest
from segaware_caffe.data.listfile import c_atoi
from segaware_caffe.layer import layer_class

MEAN = (104.008, 116.669, 122.675)
MEAN32 = np.asarray(MEAN, np.float32).astype(np.float64)   # the proto stores floats
SIZES = [(20, 30), (25, 18), (12, 14), (30, 30), (16, 22), (21, 17)]   # (H, W)
LABEL_VALUES = np.array([0, 1, 2, 3, 4, 255], np.uint8)


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "0")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 RGB images (4 PNG, 2 JPG) of varying sizes, label PNGs with 0..4 and 255, and list files
    in the released formats (paths starting with "/", relative to root_folder)."""
    root = tmp_path_factory.mktemp("voc")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClassAug").mkdir()
    rng = np.random.default_rng(0)
    images, labels, seg_lines, ids, class_lines = [], [], [], [], []
    for i, (h, w) in enumerate(SIZES):
        name = f"2007_{i:06d}"
        ext = "jpg" if i in (1, 4) else "png"
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.{ext}")
        with Image.open(root / "JPEGImages" / f"{name}.{ext}") as im:   # JPG: as decoded
            rgb = np.asarray(im.convert("RGB"))
        label = rng.choice(LABEL_VALUES, (h, w))
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{name}.png")
        images.append(rgb[:, :, ::-1].copy())      # BGR
        labels.append(label)
        seg_lines.append(f"/JPEGImages/{name}.{ext} /SegmentationClassAug/{name}.png")
        ids.append(name)
        class_lines.append(f"/JPEGImages/{name}.{ext} {i % 3}")
    (root / "seg.txt").write_text("\n".join(seg_lines) + "\n")
    (root / "seg_id.txt").write_text("\n".join(ids) + "\n")
    (root / "class.txt").write_text("\n".join(class_lines) + "\n")
    return {"root": str(root), "images": images, "labels": labels}


def build(text, phase="TEST", base_dir="."):
    layer_param = caffe_proto.read_net(text).layer[0]
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase=phase,
                       top_names=list(layer_param.top), base_dir=base_dir)
    return layer_class(layer_param.type, layer_param.name).from_proto(layer_param, ctx)


def seg_layer(dataset, *, transform="", data_param="", tops=("data", "label", "data_dim"),
              phase="TEST", type_name="ImageSegData", label_type="PIXEL"):
    top_text = " ".join(f'top: "{t}"' for t in tops)
    mean = " ".join(f"mean_value: {m}" for m in MEAN)
    root = dataset["root"]
    label_type = f"label_type: {label_type}" if type_name == "ImageSegData" and label_type else ""
    return build(f'''layer {{ name: "data" type: "{type_name}" {top_text}
        transform_param {{ {mean} {transform} }}
        image_data_param {{ root_folder: "{root}" source: "{root}/seg.txt" {label_type}
                            {data_param} }} }}''', phase=phase)


def expected_seg(image, label, crop, top, left, mirror=False, scale=1.0, mean=MEAN32):
    """Pad bottom/right with the mean (labels 255), crop at (top, left), mirror, subtract."""
    h, w = image.shape[:2]
    ch, cw = crop
    ph, pw = max(ch, h), max(cw, w)
    pixels = np.empty((ph, pw, image.shape[2]), np.float64)
    pixels[...] = mean
    pixels[:h, :w] = image
    lab = np.full((ph, pw), 255, np.uint8)
    lab[:h, :w] = label
    pixels, lab = pixels[top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]
    if mirror:
        pixels, lab = pixels[:, ::-1], lab[:, ::-1]
    data = ((pixels - np.asarray(mean)) * scale).astype(np.float32).transpose(2, 0, 1)
    return data, lab[None].astype(np.float32)


# ------------------------------------------------------------------ ImageSegData, TEST phase
def test_test_phase_centre_crop_and_pad_exact(dataset):
    layer = seg_layer(dataset, transform="crop_size: 24", data_param="batch_size: 2")
    assert layer.output_shapes([]) == [(2, 3, 24, 24), (2, 1, 24, 24), (2, 1, 1, 2)]
    got = [layer() for _ in range(3)]
    for i, (h, w) in enumerate(SIZES):
        data, label, data_dim = (t[i % 2] for t in got[i // 2])
        top, left = max(h - 24, 0) // 2, max(w - 24, 0) // 2   # centred on the padded image
        want_data, want_label = expected_seg(dataset["images"][i], dataset["labels"][i],
                                             (24, 24), top, left)
        np.testing.assert_array_equal(data.numpy(), want_data)
        np.testing.assert_array_equal(label.numpy(), want_label)
        assert data_dim.flatten().tolist() == [min(24, h), min(24, w)]
        # padded region: exactly 0 after the mean, 255 in the label
        assert not data[:, h:, :].any() and not data[:, :, w:].any()
        assert (label[:, h:, :] == 255).all() and (label[:, :, w:] == 255).all()


def test_bgr_order_and_scale(dataset):
    layer = seg_layer(dataset, transform="crop_size: 30 scale: 0.5")
    data, _, _ = layer()
    rgb = dataset["images"][0][:, :, ::-1]
    # channel 0 is blue: (B - 104.008) * 0.5, in float64 then rounded to float32
    want_blue = ((rgb[:, :, 2].astype(np.float64) - MEAN32[0]) * 0.5).astype(np.float32)
    np.testing.assert_array_equal(data[0, 0, :20, :30].numpy(), want_blue)
    assert data.dtype == torch.float32


def test_non_square_crop_and_two_tops(dataset):
    layer = seg_layer(dataset, transform="crop_height: 10 crop_width: 16", tops=("data", "label"))
    assert layer.output_shapes([]) == [(1, 3, 10, 16), (1, 1, 10, 16)]
    data, label = layer()
    want_data, want_label = expected_seg(dataset["images"][0], dataset["labels"][0], (10, 16),
                                         (20 - 10) // 2, (30 - 16) // 2)
    np.testing.assert_array_equal(data[0].numpy(), want_data)
    np.testing.assert_array_equal(label[0].numpy(), want_label)


def test_no_crop_gives_image_size(dataset):
    layer = seg_layer(dataset)
    assert layer.output_shapes([])[0] == (1, 3) + SIZES[0]
    for i, size in enumerate(SIZES):
        data, label, data_dim = layer()
        assert tuple(data.shape[2:]) == size and tuple(label.shape[2:]) == size
        assert data_dim.flatten().tolist() == list(size)
        np.testing.assert_array_equal(label[0, 0].numpy(), dataset["labels"][i])


def test_grayscale_with_single_mean(dataset):
    root = dataset["root"]
    layer = build(f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
        transform_param {{ mean_value: 100 crop_size: 32 }}
        image_data_param {{ root_folder: "{root}" source: "{root}/seg.txt" is_color: false
                            label_type: NONE ignore_label: 7 }} }}''')
    data, label = layer()
    assert data.shape == (1, 1, 32, 32)
    with Image.open(os.path.join(root, "JPEGImages", "2007_000000.png")) as im:
        gray = np.asarray(im.convert("L")).astype(np.float64)
    np.testing.assert_array_equal(data[0, 0, :20, :30].numpy(), (gray - 100).astype(np.float32))
    assert not data[0, 0, 20:].any()
    # label_type NONE: ignore_label everywhere (image area and padding alike)
    assert (label == 7).all()


def test_label_type_image_parses_integers_and_warns_on_paths(dataset, tmp_path):
    root = dataset["root"]
    (tmp_path / "list.txt").write_text("/JPEGImages/2007_000000.png 3\n"
                                       "/JPEGImages/2007_000002.png 300\n"
                                       "/JPEGImages/2007_000003.png 12abc\n")
    layer = build(f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
        image_data_param {{ root_folder: "{root}" source: "{tmp_path}/list.txt" }} }}''')
    values = [layer()[1].unique().tolist() for _ in range(3)]
    assert values == [[3.0], [255.0], [12.0]]   # atoi, saturated to 8 bits
    with pytest.warns(UserWarning, match=r"data \(ImageSegData\): label_type defaults to IMAGE"):
        layer = seg_layer(dataset, label_type=None)
    assert layer()[1].unique().tolist() == [0.0]


# ------------------------------------------------------------------ TRAIN randomness
def find_window(big, small):
    """All (top, left, mirrored) where `small` (C,h,w) equals a window of `big` (C,H,W)."""
    _, h, w = small.shape
    hits = []
    for top in range(big.shape[1] - h + 1):
        for left in range(big.shape[2] - w + 1):
            window = big[:, top:top + h, left:left + w]
            if np.array_equal(window, small):
                hits.append((top, left, False))
            if np.array_equal(window[:, :, ::-1], small):
                hits.append((top, left, True))
    return hits


def test_train_random_crop_and_mirror_shared_by_image_and_label(dataset):
    torch.manual_seed(0)
    layer = seg_layer(dataset, transform="crop_size: 12 mirror: true", phase="TRAIN",
                      type_name="TwoImageData", tops=("data", "label"))
    image = dataset["images"][3]            # 30 x 30: crop offsets 0..18
    full_data = ((image.astype(np.float64) - MEAN32).astype(np.float32)).transpose(2, 0, 1)
    full_label = dataset["labels"][3][None].astype(np.float32)
    seen = set()
    for _ in range(8):                      # item 3 comes up once per pass of 6
        for _ in range(3):
            layer()
        data, label = layer()
        for _ in range(2):
            layer()
        hits = find_window(full_data, data[0].numpy())
        assert len(hits) == 1, hits
        top, left, mirrored = hits[0]
        assert 0 <= top <= 18 and 0 <= left <= 18
        want = full_label[:, top:top + 12, left:left + 12]
        np.testing.assert_array_equal(label[0].numpy(), want[:, :, ::-1] if mirrored else want)
        seen.add(hits[0])
    assert len({(t, l) for t, l, _ in seen}) > 3
    assert {m for _, _, m in seen} == {False, True}


def test_train_crop_of_padded_image_stays_in_bounds(dataset):
    torch.manual_seed(1)
    layer = seg_layer(dataset, transform="crop_size: 22", phase="TRAIN")
    for _ in range(12):
        data, label, data_dim = layer()
        # item 2 is 12x14: padded to 22x22, a crop of 22 has offset 0 -> fixed
    item2 = [layer() for _ in range(6)][2]
    want_data, want_label = expected_seg(dataset["images"][2], dataset["labels"][2], (22, 22), 0, 0)
    np.testing.assert_array_equal(item2[0][0].numpy(), want_data)
    np.testing.assert_array_equal(item2[1][0].numpy(), want_label)


def test_scale_factors_resize_image_bilinear_and_label_nearest(dataset):
    layer = seg_layer(dataset, transform="scale_factors: 0.5", phase="TEST")
    for i, (h, w) in enumerate(SIZES):
        data, label, data_dim = layer()
        assert tuple(data.shape[2:]) == (int(h * 0.5), int(w * 0.5))
        assert data_dim.flatten().tolist() == [h, w]    # before the scale factor
        want_label = resize_nearest(dataset["labels"][i], int(h * 0.5), int(w * 0.5))
        np.testing.assert_array_equal(label[0, 0].numpy(), want_label)
        want_image = resize_bilinear(dataset["images"][i], int(h * 0.5), int(w * 0.5))
        np.testing.assert_array_equal(
            data[0].numpy(), ((want_image - MEAN32).astype(np.float32)).transpose(2, 0, 1))


def test_new_size_resize(dataset):
    layer = seg_layer(dataset, data_param="new_height: 9 new_width: 11", tops=("data", "label"))
    data, label = layer()
    assert data.shape == (1, 3, 9, 11)
    want = resize_bilinear(dataset["images"][0], 9, 11)
    np.testing.assert_array_equal(data[0].numpy(),
                                  ((want - MEAN32).astype(np.float32)).transpose(2, 0, 1))
    # ImageSegData resizes its label bilinearly (as the original); TwoImageData uses nearest
    np.testing.assert_array_equal(label[0, 0].numpy(), resize_bilinear(dataset["labels"][0], 9, 11))
    two = seg_layer(dataset, data_param="new_height: 9 new_width: 11", type_name="TwoImageData",
                    tops=("data", "label"))
    np.testing.assert_array_equal(two()[1][0, 0].numpy(), resize_nearest(dataset["labels"][0], 9, 11))


# ------------------------------------------------------------------ order, epochs, workers
def item_ids(data_dim):
    sizes = [tuple(int(v) for v in d.flatten()) for d in data_dim]
    return [SIZES.index(s) for s in sizes]


def test_epoch_wrap_around_in_list_order(dataset):
    layer = seg_layer(dataset, transform="crop_size: 32", data_param="batch_size: 4")
    batches = [item_ids(layer()[2]) for _ in range(3)]
    assert batches == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]


def order_of(dataset, batches, **kwargs):
    layer = seg_layer(dataset, transform="crop_size: 32", data_param="batch_size: 3 shuffle: true",
                      **kwargs)
    order = [i for _ in range(batches) for i in item_ids(layer()[2])]
    layer.close()
    return order


def test_shuffle_reshuffles_each_epoch_and_follows_torch_seed(dataset):
    torch.manual_seed(5)
    order = order_of(dataset, 8)                       # 4 passes of 6 items
    passes = [order[k:k + 6] for k in range(0, 24, 6)]
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1
    torch.manual_seed(5)
    assert order_of(dataset, 8) == order


def test_worker_processes_give_the_same_batches(dataset, monkeypatch):
    torch.manual_seed(3)
    layer = seg_layer(dataset, transform="crop_size: 10 mirror: true", phase="TRAIN",
                      data_param="batch_size: 2 shuffle: true")
    serial = [layer() for _ in range(4)]
    monkeypatch.setenv(WORKERS_ENV, "2")
    torch.manual_seed(3)
    layer = seg_layer(dataset, transform="crop_size: 10 mirror: true", phase="TRAIN",
                      data_param="batch_size: 2 shuffle: true")
    parallel = [layer() for _ in range(4)]
    layer.close()
    for a, b in zip(serial, parallel):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_rand_skip_starts_inside_the_list(dataset):
    starts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        layer = seg_layer(dataset, transform="crop_size: 32", data_param="rand_skip: 4 batch_size: 6")
        ids = item_ids(layer()[2])
        starts.add(ids[0])
        assert ids == [(ids[0] + k) % 6 for k in range(6)]
    assert starts <= {0, 1, 2, 3} and len(starts) > 1


def test_follows_net_dtype(dataset):
    layer = seg_layer(dataset, transform="crop_size: 8").to(torch.float64)
    assert all(t.dtype == torch.float64 for t in layer())


# ------------------------------------------------------------------ ImageData
def image_data_layer(dataset, transform, phase="TEST", source="class.txt"):
    root = dataset["root"]
    return build(f'''layer {{ name: "data" type: "ImageData" top: "data" top: "label"
        transform_param {{ {transform} }}
        image_data_param {{ root_folder: "{root}" source: "{root}/{source}" batch_size: 3 }} }}''',
                 phase=phase)


def test_image_data_centre_crop_mean_values_and_labels(dataset):
    mean = " ".join(f"mean_value: {m}" for m in MEAN)
    layer = image_data_layer(dataset, f"crop_size: 12 scale: 0.25 {mean}")
    assert layer.output_shapes([]) == [(3, 3, 12, 12), (3,)]
    data, label = layer()
    assert label.tolist() == [0.0, 1.0, 2.0]
    for i in range(3):
        h, w = SIZES[i]
        top, left = (h - 12) // 2, (w - 12) // 2
        window = dataset["images"][i][top:top + 12, left:left + 12].astype(np.float32)
        want = ((window - np.asarray(MEAN, np.float32)) * np.float32(0.25)).transpose(2, 0, 1)
        np.testing.assert_array_equal(data[i].numpy(), want)


def test_image_data_mean_file(dataset, tmp_path):
    mean_image = np.random.default_rng(1).uniform(0, 255, (1, 3, 20, 30)).astype(np.float32)
    caffe_proto.write_blob(mean_image, tmp_path / "mean.binaryproto")
    root = dataset["root"]
    (tmp_path / "one.txt").write_text("/JPEGImages/2007_000000.png 5\n")
    layer = build(f'''layer {{ name: "data" type: "ImageData" top: "data" top: "label"
        transform_param {{ crop_size: 10 mean_file: "{tmp_path}/mean.binaryproto" }}
        image_data_param {{ root_folder: "{root}" source: "{tmp_path}/one.txt" }} }}''')
    data, label = layer()
    want = (dataset["images"][0].transpose(2, 0, 1).astype(np.float32) - mean_image[0])
    np.testing.assert_array_equal(data[0].numpy(), want[:, 5:15, 10:20])
    assert label.tolist() == [5.0]


def test_image_data_train_crop_and_mirror(dataset):
    torch.manual_seed(2)
    layer = image_data_layer(dataset, "crop_size: 10 mirror: true", phase="TRAIN")
    seen = set()
    for _ in range(10):
        data, _ = layer()
        full = dataset["images"][0].transpose(2, 0, 1).astype(np.float32)
        hits = find_window(full, data[0].numpy())
        assert hits and all(0 <= t <= 10 and 0 <= l <= 20 for t, l, _ in hits)
        seen.update(hits)
        layer()
    assert {m for _, _, m in seen} == {False, True}


def test_image_data_smaller_than_crop_is_a_build_error(dataset):
    with pytest.raises(NetBuildError, match=r"data \(ImageData\).*line 1.*2007_000000\.png.*"
                                            r"smaller than crop_size 513"):
        image_data_layer(dataset, "crop_size: 513")


def test_image_data_lines_without_labels_get_label_zero(dataset, tmp_path):
    root = dataset["root"]
    (tmp_path / "list.txt").write_text("/JPEGImages/2007_000000.png 1\n"
                                       "/JPEGImages/2007_000002.png\n"
                                       "/JPEGImages/2007_000003.png /SegmentationClassAug/x.png\n")
    with pytest.warns(UserWarning, match=r"2 line\(s\) have no integer label \(first: line 2"):
        layer = build(f'''layer {{ name: "data" type: "ImageData" top: "data" top: "label"
            transform_param {{ crop_size: 10 }}
            image_data_param {{ root_folder: "{root}" source: "{tmp_path}/list.txt"
                                batch_size: 3 }} }}''')
    data, label = layer()
    assert label.tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_array_equal(data[2].numpy(),
                                  dataset["images"][3][10:20, 10:20].transpose(2, 0, 1))


# ------------------------------------------------------------------ errors and paths
def test_relative_source_resolves_against_prototxt_dir(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = dataset["root"]
    layer = build(f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
        image_data_param {{ root_folder: "{root}" source: "seg.txt" label_type: PIXEL }} }}''',
                  base_dir=root)
    assert layer.count == 6


@pytest.mark.parametrize("fields, message", [
    ('source: "nowhere/list.txt"', r"data \(ImageSegData\): image_data_param.source "
                                   r"'nowhere/list.txt' not found"),
    ('source: "{root}/seg.txt" new_height: 10', r"new_height and new_width must be given together"),
    ('source: "{root}/seg_id.txt" label_type: PIXEL', r"line 1 has only '2007_000000'"),
    ('source: "{root}/seg.txt" label_type: PIXEL batch_size: 0', r"batch_size must be > 0"),
])
def test_setting_errors_name_the_layer(dataset, fields, message):
    fields = fields.format(root=dataset["root"])
    with pytest.raises(NetBuildError, match=message):
        build(f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
            image_data_param {{ root_folder: "{dataset['root']}" {fields} }} }}''')


@pytest.mark.parametrize("transform, message", [
    ('mean_file: "m.binaryproto"', r"mean_file is not supported"),
    ("crop_size: 5 crop_height: 4 crop_width: 4", r"either crop_size or crop_height/crop_width"),
    ("crop_height: 4", r"crop_height and crop_width must be given together"),
    ("mean_value: 1 mean_value: 2", r"2 mean_value entries for 3-channel images"),
])
def test_transform_errors(dataset, transform, message):
    root = dataset["root"]
    with pytest.raises(NetBuildError, match=message):
        build(f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
            transform_param {{ {transform} }}
            image_data_param {{ root_folder: "{root}" source: "{root}/seg.txt" label_type: PIXEL }}
            }}''')


def test_missing_image_names_file_and_line(dataset, tmp_path):
    root = dataset["root"]
    (tmp_path / "list.txt").write_text("/JPEGImages/2007_000000.png /SegmentationClassAug/2007_000000.png\n"
                                       "/JPEGImages/missing.jpg /SegmentationClassAug/2007_000001.png\n")
    layer = build(f'''layer {{ name: "data" type: "TwoImageData" top: "data" top: "label"
        image_data_param {{ root_folder: "{root}" source: "{tmp_path}/list.txt" }} }}''')
    layer()
    with pytest.raises(DataError, match=r"data \(TwoImageData\): list .*list\.txt, line 2 .*"
                                        r"cannot read image '.*missing\.jpg'"):
        layer()


@pytest.mark.parametrize("image, problem", [
    ("nothing.jpg", None),                  # missing
    ("bad.png", b"not an image"),           # unreadable
])
def test_unreadable_first_image_without_crop_is_a_build_error(dataset, tmp_path, image, problem):
    if problem is not None:
        (tmp_path / image).write_bytes(problem)
    (tmp_path / "list.txt").write_text(f"/{image} /{image}\n")
    with pytest.raises(NetBuildError, match=rf"data \(TwoImageData\): list .*list\.txt, line 1 "
                                            rf".*cannot read image '.*{re.escape(image)}'"):
        build(f'''layer {{ name: "data" type: "TwoImageData" top: "data" top: "label"
            image_data_param {{ root_folder: "{tmp_path}" source: "{tmp_path}/list.txt" }} }}''')


def test_with_a_crop_the_net_builds_without_its_dataset(tmp_path):
    (tmp_path / "list.txt").write_text("/nothing.jpg /nothing.png\n")
    layer = build(f'''layer {{ name: "data" type: "TwoImageData" top: "data" top: "label"
        transform_param {{ crop_size: 9 }}
        two_image_data_param {{ second_is_color: true }}
        image_data_param {{ root_folder: "{tmp_path}" source: "{tmp_path}/list.txt" }} }}''')
    assert layer.output_shapes([]) == [(1, 3, 9, 9), (1, 3, 9, 9)]
    with pytest.raises(DataError, match=r"cannot read image '.*nothing\.jpg'"):
        layer()


def test_batches_of_different_sizes_without_crop_are_a_clear_error(dataset):
    layer = seg_layer(dataset, data_param="batch_size: 2")
    with pytest.raises(DataError, match=r"data \(ImageSegData\): the items of one batch have "
                                        r"different sizes"):
        layer()


def test_palette_label_png_warns(dataset, tmp_path):
    root = dataset["root"]
    palette = Image.fromarray(dataset["labels"][0]).convert("P")
    palette.save(tmp_path / "label.png")
    (tmp_path / "list.txt").write_text(f"{root}/JPEGImages/2007_000000.png {tmp_path}/label.png\n")
    with pytest.warns(UserWarning, match="palette PNG"):
        build(f'''layer {{ name: "data" type: "TwoImageData" top: "data" top: "label"
            image_data_param {{ source: "{tmp_path}/list.txt" }} }}''')


# ------------------------------------------------------------------ helpers vs OpenCV's formulas
def _opencv_linear_source(index, size, src_size):
    """(first source index, second, weight of the second) of output `index` along one axis for
    cv::INTER_LINEAR: half-pixel centres, clamped at both edges."""
    f = (index + 0.5) * src_size / size - 0.5
    s = int(np.floor(f))
    f -= s
    if s < 0:
        s, f = 0, 0.0
    if s >= src_size - 1:
        s, f = src_size - 1, 0.0
    return s, min(s + 1, src_size - 1), f


def opencv_bilinear_reference(src, height, width):
    """cv::INTER_LINEAR in float: half-pixel centres, edge clamping, then rounding."""
    src = src.astype(np.float64)
    out = np.empty((height, width) + src.shape[2:])
    for y in range(height):
        sy, sy1, fy = _opencv_linear_source(y, height, src.shape[0])
        for x in range(width):
            sx, sx1, fx = _opencv_linear_source(x, width, src.shape[1])
            out[y, x] = ((1 - fy) * ((1 - fx) * src[sy, sx] + fx * src[sy, sx1])
                         + fy * ((1 - fx) * src[sy1, sx] + fx * src[sy1, sx1]))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(9, 11), (10, 15), (31, 47), (20, 30)])
def test_resize_bilinear_matches_opencv_formula(size):
    src = np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    got = resize_bilinear(src, *size)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - opencv_bilinear_reference(src, *size).astype(int)).max() <= 1


def test_resize_nearest_matches_opencv_formula():
    src = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)
    got = resize_nearest(src, 3, 10)
    rows = [int(np.floor(y * 5 / 3)) for y in range(3)]
    cols = [min(int(np.floor(x * 7 / 10)), 6) for x in range(10)]
    np.testing.assert_array_equal(got, src[np.ix_(rows, cols)])


def test_c_atoi():
    assert [c_atoi(s) for s in ("12", " -3", "12abc", "abc", "", "+7x")] == [12, -3, 12, 0, 0, 7]


# ------------------------------------------------------------------ through the net builder
TRAIN_NET = """
name: "tiny_seg"
layer {{
  name: "data" type: "{type}" top: "data" top: "label"
  transform_param {{ mirror: true crop_size: 21 mean_value: 104.008 mean_value: 116.669
                    mean_value: 122.675 {scale_factors} }}
  image_data_param {{ root_folder: "{root}" source: "seg.txt" batch_size: 2 shuffle: true
                     {label_type} }}
}}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 5 kernel_size: 3 stride: 2 pad: 1
                      weight_filler {{ type: "gaussian" std: 0.001 }} }} }}
layer {{ name: "up" type: "Interp" bottom: "conv1" top: "up" interp_param {{ zoom_factor: 2 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "up" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 }} }}
"""


@pytest.mark.parametrize("type_name", ["ImageSegData", "TwoImageData"])
def test_train_net_two_iterations(dataset, type_name):
    from segaware_caffe import Net
    torch.manual_seed(0)
    text = TRAIN_NET.format(type=type_name, root=dataset["root"],
                            scale_factors="scale_factors: 0.75 scale_factors: 1",
                            label_type="label_type: PIXEL" if type_name == "ImageSegData" else "")
    path = os.path.join(dataset["root"], f"train_{type_name}.prototxt")
    with open(path, "w") as f:
        f.write(text)
    net = Net(path, phase="train")    # source "seg.txt" resolves beside the prototxt
    assert net.blob_shapes["data"] == (2, 3, 21, 21) and net.blob_shapes["up"] == (2, 5, 21, 21)
    weight = net.params["conv1"][0]
    seen = []
    for _ in range(2):
        out = net.forward(outputs=["loss", "data", "label"])
        loss = net.loss(out)
        assert torch.isfinite(loss) and 0 < loss.item() < 10
        weight.grad = None
        loss.backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        with torch.no_grad():
            weight -= 0.01 * weight.grad
        assert set(out["label"].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0, 255.0}
        seen.append(out["data"])
    assert not torch.equal(seen[0], seen[1])     # the second iteration read the next batch

