"""test --png writes one VOC-palette PNG per image of the data layer's list, cropped to the image's
own size, in the layer's order (batches > 1, a wrapped list); MatWrite's .mat files give the same
PNGs through mat2png and the same scores through eval; errors name the image, blob or file."""
import re

import numpy as np
import pytest
from PIL import Image

from segaware_caffe.label_maps import labels_from_scores, voc_palette
from segaware_caffe.tools.cli import main
from segaware_caffe.tools.cmd_eval import read_label_png

CROP = 12
IMAGES = [("a", 9, 11), ("b", 12, 7), ("c", 5, 12)]     # (id, height, width)


def net_text(root, batch, mat_write=False, crop=CROP):
    text = f"""
name: "scores_are_pixels"
layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
  image_data_param {{ source: "{root}/list.txt" root_folder: "{root}/" batch_size: {batch}
                      label_type: PIXEL }}
  transform_param {{ crop_size: {crop} }} }}
layer {{ name: "scores" type: "Power" bottom: "data" top: "scores" }}
layer {{ name: "silence" type: "Silence" bottom: "label" }}
"""
    if mat_write:
        text += f"""layer {{ name: "mat" type: "MatWrite" bottom: "scores"
  mat_write_param {{ prefix: "feat/val/" source: "{root}/ids.txt" }} }}
"""
    return text


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """PNG images (lossless, so the expected labels are exact) whose B, G, R values are the
    scores of three classes, and label maps of the right size."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGAWARE_DATA_WORKERS", "0")   # batches in this process: no workers to stop
    rng = np.random.default_rng(5)
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    expected = {}
    for image_id, height, width in IMAGES:
        rgb = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "img" / f"{image_id}.png")
        bgr = rgb[:, :, ::-1].transpose(2, 0, 1).astype(np.float64)
        expected[image_id] = bgr.argmax(axis=0)
        Image.fromarray(rng.integers(0, 3, (height, width), dtype=np.uint8), mode="L").save(
            tmp_path / "gt" / f"{image_id}.png")
    (tmp_path / "list.txt").write_text("".join(f"img/{i}.png gt/{i}.png\n" for i, _, _ in IMAGES))
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i, _, _ in IMAGES))
    return tmp_path, expected


def run_test(root, *extra, batch=2, mat_write=False, crop=CROP):
    (root / "net.prototxt").write_text(net_text(root, batch, mat_write, crop))
    return main(["test", "--model", str(root / "net.prototxt"), *map(str, extra)])


def test_pngs_per_image_in_the_layers_order_with_batches(dataset, capsys):
    root, expected = dataset
    assert run_test(root, "--png", root / "out") == 0           # 2 batches of 2: a, b | c, a
    err = capsys.readouterr().err
    assert "one pass over the list, 2 batch(es)" in err
    assert "Wrote 3 label PNG(s) of scores to" in err and "1 repeated item(s)" in err
    for image_id, height, width in IMAGES:
        image = Image.open(root / "out" / f"{image_id}.png")
        assert image.mode == "P" and image.size == (width, height)
        assert image.getpalette()[:9] == voc_palette(3).ravel().tolist()
        np.testing.assert_array_equal(np.asarray(image), expected[image_id], err_msg=image_id)


def test_mat_files_give_the_same_pngs_and_scores(dataset, capsys):
    root, expected = dataset
    assert run_test(root, "--png", root / "out", batch=1, mat_write=True) == 0
    err = capsys.readouterr().err
    assert "Created folder feat/val for mat (MatWrite)" in err
    assert "scores" in err   # the default blob: what MatWrite writes
    assert main(["mat2png", "feat/val", "--list", "ids.txt", "--images", "img", "--out", "m"]) == 0
    assert "wrote 3 label PNG(s) to m" in capsys.readouterr().out
    # an `image label` list names the images itself (with --root as the data layer's root_folder)
    assert main(["mat2png", "feat/val", "--list", "list.txt", "--root", "", "--out", "m2"]) == 0
    capsys.readouterr()
    for image_id, _, _ in IMAGES:
        for folder in ("out", "m", "m2"):
            np.testing.assert_array_equal(read_label_png(root / folder / f"{image_id}.png"),
                                          expected[image_id], err_msg=f"{folder}/{image_id}")
    tables = []
    for pred in ("out", "feat/val"):
        assert main(["eval", "--pred", pred, "--gt", "gt", "--list", "ids.txt",
                     "--num-classes", "3"]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "(3 images" in tables[0]


def test_rerunning_needs_force(dataset, capsys):
    root, _ = dataset
    assert run_test(root, "--png", root / "out", batch=1, mat_write=True) == 0
    capsys.readouterr()
    assert run_test(root, "--png", root / "other", batch=1, mat_write=True) == 1
    assert re.search(r"feat/val/a_blob_0.mat already exists", capsys.readouterr().err)
    assert run_test(root, "--png", root / "out", batch=1, mat_write=True) == 1
    assert "out: folder exists and is not empty; pass --force" in capsys.readouterr().err
    assert run_test(root, "--png", root / "out", "--force", batch=1, mat_write=True) == 0


def test_an_image_larger_than_the_crop_is_named(dataset, capsys):
    root, _ = dataset
    assert run_test(root, "--png", root / "out", crop=10) == 1
    err = capsys.readouterr().err
    assert re.search(r"image \S+img/a.png is 11x9 \(width x height\), larger than the crop 10x10", err)
    assert "set crop_size to at least 11" in err


def test_png_blob_must_be_at_the_inputs_size(dataset, capsys):
    root, _ = dataset
    text = net_text(root, 1) + """layer { name: "small" type: "Pooling" bottom: "scores" top: "small"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "flat" type: "Flatten" bottom: "scores" top: "flat" }
"""
    (root / "net.prototxt").write_text(text)
    for blob, message in (("small", "--png-blob small is 6x6 (width x height), the input 'data' 12x12"),
                          ("flat", "--png-blob flat: PNGs need a 4-D N x C x H x W score map"),
                          ("nothing", "--png-blob nothing: the net has no blob of that name")):
        assert main(["test", "--model", str(root / "net.prototxt"), "--png", str(root / blob),
                     "--png-blob", blob]) == 1
        assert message in capsys.readouterr().err, blob
    assert main(["test", "--model", str(root / "net.prototxt"), "--png-blob", "small"]) == 1
    assert "give --png DIR too" in capsys.readouterr().err


def test_mat2png_errors(dataset, capsys):
    root, _ = dataset
    assert run_test(root, "--iterations", 3, batch=1, mat_write=True) == 0
    capsys.readouterr()
    (root / "ids_more.txt").write_text("a\nzz\n")
    assert main(["mat2png", "feat/val", "--list", "ids_more.txt", "--images", "img", "--out", "m"]) == 1
    assert "no score map for id 'zz' (zz_blob_0.mat)" in capsys.readouterr().err
    assert main(["mat2png", "feat/val", "--list", "ids.txt", "--out", "m"]) == 1
    assert "names images by id only; give --images DIR" in capsys.readouterr().err
    assert not (root / "m").exists()         # nothing written before every input was found


def test_labels_from_scores_and_a_map_smaller_than_its_image():
    from segaware_caffe.label_maps import LabelMapError, crop_to_image
    scores = np.zeros((3, 2, 2), np.float32)
    scores[1, 0, 0] = scores[2, 0, 0] = 1.0          # a tie: the first channel wins
    scores[2, 1, 1] = 5.0
    assert labels_from_scores(scores).tolist() == [[1, 0], [0, 2]]
    assert labels_from_scores(np.full((1, 1, 2), 2.6)).tolist() == [[3, 3]]
    with pytest.raises(LabelMapError, match=r"the map is 2x2 \(width x height\), smaller than its image, 3x2"):
        crop_to_image(np.zeros((2, 2)), (2, 3), where="m")


def test_png_of_a_net_fed_with_input_arrays(tmp_path, capsys):
    """Without a list-driven data layer the PNGs are numbered and not cropped; one pass."""
    (tmp_path / "net.prototxt").write_text("""
input: "data" input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }
layer { name: "scores" type: "Power" bottom: "data" top: "scores" }""")
    scores = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", scores)
    assert main(["test", "--model", str(tmp_path / "net.prototxt"), "--input", f"data={tmp_path}/x.npy",
                 "--png", str(tmp_path / "out")]) == 0
    assert "Running for 1 iterations." in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000.png", "000001.png"]
    for n in range(2):
        np.testing.assert_array_equal(read_label_png(tmp_path / "out" / f"00000{n}.png"),
                                      scores[n].argmax(axis=0))
