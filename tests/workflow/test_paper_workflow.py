"""The paper's workflow end to end on a generated VOC-like set, with the released configs
instantiated from their templates at a small crop size, through the command line only:
train embs -> fine-tune vgg from its snapshot (embs' conv layers renamed into vgg's emb branch)
-> `test --png` (PNGs cropped to each image, MatWrite's .mat files alongside) -> `eval`; the
.mat files give the same PNGs through `mat2png` and the same scores through `eval`, and a second
`test` needs --force. No step needs a script of the user's."""
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from segaware_caffe.tools.cli import main
from segaware_caffe.tools.cmd_eval import read_label_png

CROP = 41
# (id, height, width): every image fits in the crop, none is square, one fills it exactly
TRAIN_IMAGES = [("2007_000001", 33, 41), ("2007_000002", 41, 29)]
VAL_IMAGES = [("2008_000003", 37, 30), ("2008_000004", 25, 41), ("2008_000005", 41, 41)]


def draw_image(rng, height, width):
    """An image of two or three flat regions with a VOC class each (the rest background), its
    label map with a 255 border between regions, like SegmentationClass."""
    image = rng.integers(90, 140, (height, width, 3)).astype(np.int16)
    label = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, 4))):
        top, left = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        bottom, right = top + int(rng.integers(6, height - top + 1)), left + int(rng.integers(6, width - left + 1))
        cls = int(rng.integers(1, 21))
        image[top:bottom, left:right] = rng.integers(0, 256, 3)
        label[top:bottom, left:right] = cls
        label[top, left:right] = label[bottom - 1, left:right] = 255
    return np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8), label


def make_dataset(root):
    rng = np.random.default_rng(14)
    for folder in ("JPEGImages", "SegmentationClass", "list"):
        (root / folder).mkdir()
    for set_name, images in (("tiny_train", TRAIN_IMAGES), ("tiny_val", VAL_IMAGES)):
        lines = []
        for image_id, height, width in images:
            image, label = draw_image(rng, height, width)
            Image.fromarray(image[:, :, ::-1].copy()).save(root / "JPEGImages" / f"{image_id}.jpg",
                                                          quality=95)
            # grey values = classes, like SegmentationClassAug (the data layers read labels as
            # OpenCV does: a palette PNG would be read as its luminance)
            Image.fromarray(label, mode="L").save(root / "SegmentationClass" / f"{image_id}.png")
            lines.append(f"/JPEGImages/{image_id}.jpg /SegmentationClass/{image_id}.png")
        (root / "list" / f"{set_name}.txt").write_text("\n".join(lines) + "\n")
        (root / "list" / f"{set_name}_id.txt").write_text("\n".join(i for i, _, _ in images) + "\n")


def make_experiment(root, reference):
    """config/<net>/ as released (the templates, untouched) and one vars file per net, as the
    original run scripts set them."""
    for net in ("embs", "vgg"):
        (root / "config" / net).mkdir(parents=True)
        (root / "model" / net).mkdir(parents=True)
        source = reference / "segaware" / "config" / net
        shutil.copy(source / "solver.prototxt", root / "config" / net / "solver.prototxt")
        shutil.copy(source / "train.prototxt", root / "config" / net / "train_tiny_train.prototxt")
        shutil.copy(source / "test.prototxt", root / "config" / net / "test.prototxt")
    common = (f"EXP={root}\nTRAIN_SET=tiny_train\nTEST_SET=tiny_val\nDATA_ROOT={root}\n"
              f"BATCH_SIZE=1\nCROP_SIZE={CROP}\nLEARNING_RATE=0.001\nSOLVER_MODE=CPU\n"
              f"FEATURE_DIR=features\n")
    (root / "embs.sh").write_text(common + "NET_ID=embs\nMASK_SIZE=3\nMASK_PAD=1\nMASK_DILATION=1\n"
                                  "MASK2_SIZE=3\nMASK2_PAD=2\nMASK2_DILATION=2\n"
                                  "MASK3_SIZE=3\nMASK3_PAD=5\nMASK3_DILATION=5\n")
    (root / "vgg.sh").write_text(common + "NET_ID=vgg\nSTEP=10\nITERS=2\nSNAP=2\nDATASET=voc\n"
                                 "NUM_LABELS=21\nEMBS_LR1=1\nEMBS_LR2=2\nMAINSCALE_LR1=1\n"
                                 "MAINSCALE_LR2=2\n")


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, (argv, captured.err[-4000:])
    return captured.out, captured.err


@pytest.mark.slow
def test_train_finetune_test_score(tmp_path, reference, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)       # MatWrite writes inside the working directory
    monkeypatch.setenv("SEGAWARE_DATA_WORKERS", "0")   # a handful of images: no loader processes
    make_dataset(tmp_path)
    make_experiment(tmp_path, reference)

    # 1. the embedding net from its fillers, two iterations (its solver says 24000)
    _, err = cli(capsys, "train", "--solver", "config/embs/solver.prototxt", "--vars", "embs.sh",
                 "--iterations", 2)
    assert "Iteration 0, parameter checksum = " in err and "Optimization Done." in err
    embs = tmp_path / "model/embs/train_tiny_train_iter_2.caffemodel"
    assert embs.is_file()

    # 2. vgg fine-tuned from it: embs' conv1_1..conv3_1 go to the emb branch, not the main one
    _, err = cli(capsys, "train", "--solver", "config/vgg/solver.prototxt", "--vars", "vgg.sh",
                 "--weights", embs, "--rename", r"conv(\d)_(\d)=emb\1_\2")
    assert f"Copied 5 layer(s) from {embs}: emb1_1, emb1_2, emb2_1, emb2_2, emb3_1" in err
    warning = re.search(r"^W.*(\d+) layer\(s\) start with ALL-ZERO weights.*$", err, re.M)
    # the loud warning: the vgg config leaves its main branch without weight_filler
    assert warning and "conv1_1, conv1_2, conv2_1" in warning.group(0)
    assert "(no weight_filler: Caffe's default, constant 0)" in warning.group(0)
    model = tmp_path / "model/vgg/train_tiny_train_iter_2.caffemodel"
    assert model.is_file()

    # 3. test: one pass over the val list, PNGs cropped to each image, .mat files beside
    _, err = cli(capsys, "test", "--model", "config/vgg/test.prototxt", "--vars", "vgg.sh",
                 "--weights", model, "--png", "results")
    assert "one pass over the list, 3 batch(es)" in err
    assert "Wrote 3 label PNG(s) of fc8_interp to results" in err
    for image_id, height, width in VAL_IMAGES:
        png = Image.open(tmp_path / "results" / f"{image_id}.png")
        assert png.mode == "P" and png.size == (width, height)
        assert (tmp_path / "features/tiny_val/fc8" / f"{image_id}_blob_0.mat").is_file()

    # a second run replaces nothing unless asked
    assert main(["test", "--model", "config/vgg/test.prototxt", "--vars", "vgg.sh",
                 "--weights", str(model), "--png", "results"]) == 1
    assert "results: folder exists and is not empty; pass --force" in capsys.readouterr().err
    cli(capsys, "test", "--model", "config/vgg/test.prototxt", "--vars", "vgg.sh",
        "--weights", model, "--png", "results", "--force")

    # 4. scores: the PNGs, the .mat files directly, and PNGs made from the .mat files agree
    out, _ = cli(capsys, "eval", "--pred", "results", "--gt", "SegmentationClass",
                 "--list", "list/tiny_val.txt")
    assert re.search(r"^mean IoU +[\d.]+$", out, re.M) and "(3 images" in out
    from_mat, _ = cli(capsys, "eval", "--pred", "features/tiny_val/fc8", "--gt", "SegmentationClass",
                      "--list", "list/tiny_val_id.txt")
    assert from_mat == out
    cli(capsys, "mat2png", "features/tiny_val/fc8", "--list", "list/tiny_val_id.txt",
        "--images", "JPEGImages", "--out", "from_mat")
    for image_id, _, _ in VAL_IMAGES:
        np.testing.assert_array_equal(read_label_png(tmp_path / "from_mat" / f"{image_id}.png"),
                                      read_label_png(tmp_path / "results" / f"{image_id}.png"))
