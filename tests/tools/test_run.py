"""`segaware-caffe run`: image/npy inputs, input-shape adaptation, .npy and VOC-palette .png outputs."""
import numpy as np
import pytest
import torch
from PIL import Image

from segaware_caffe import Net
from segaware_caffe.tools.cli import main
from segaware_caffe.tools.cmd_run import voc_palette

MEAN = np.asarray([104.008, 116.669, 122.675], np.float64)

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "aux" type: "Input" top: "aux" input_param { shape { dim: 1 dim: ${CLASSES} dim: 8 dim: 8 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: ${CLASSES} kernel_size: 3 pad: 1
                      weight_filler { type: "gaussian" std: 0.05 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "fused" type: "Eltwise" bottom: "score" bottom: "aux" top: "fused" }
"""


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "net.prototxt").write_text(NET)
    net = Net(str(tmp_path / "net.prototxt"), variables={"CLASSES": 5})
    net.save_weights(str(tmp_path / "w.caffemodel"))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    aux = rng.standard_normal((5, 13, 17)).astype(np.float32)
    np.save(tmp_path / "aux.npy", aux)
    data = (rgb[:, :, ::-1].astype(np.float64) - MEAN.astype(np.float32)).astype(np.float32)
    return {"dir": tmp_path, "net": net, "data": data.transpose(2, 0, 1)[None].copy(),
            "aux": aux[None]}


def cli(files, *extra):
    d = files["dir"]
    return main(["run", str(d / "net.prototxt"), "--weights", str(d / "w.caffemodel"),
                 "--set", "CLASSES=5", "--input", f"data={d / 'img.png'}",
                 "--input", f"aux={d / 'aux.npy'}", *extra])


def reference(files):
    with torch.no_grad():
        return files["net"].forward(outputs=["score", "fused"], data=torch.from_numpy(files["data"]),
                                    aux=torch.from_numpy(files["aux"]))


def test_npy_output_matches_the_net_at_image_size(files, capsys):
    d = files["dir"]
    assert cli(files, "--output", "score", "--save", str(d / "score.npy"),
               "--output", "fused", "--save", str(d / "fused.npy")) == 0
    want = reference(files)
    for name in ("score", "fused"):
        got = np.load(d / f"{name}.npy")
        assert got.shape == (1, 5, 13, 17)   # the declared 8x8 inputs follow the 13x17 image
        np.testing.assert_allclose(got, want[name].numpy(), rtol=1e-6, atol=1e-5)
    assert "score (1, 5, 13, 17) ->" in capsys.readouterr().out


def test_png_output_is_argmax_with_voc_palette(files):
    d = files["dir"]
    assert cli(files, "--save", str(d / "seg.png")) == 0     # default output: the net output "fused"
    with Image.open(d / "seg.png") as image:
        assert image.mode == "P" and image.size == (17, 13)
        labels = np.asarray(image)
        palette = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(labels, reference(files)["fused"][0].argmax(0).numpy())
    np.testing.assert_array_equal(palette[:21], voc_palette()[:21])


def test_palette_is_the_released_one(reference):
    with Image.open(reference / "segaware/results/2008_000006.png") as image:
        released = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(voc_palette()[:len(released)], released)
    assert voc_palette()[[0, 1, 2, 15, 255]].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0],
                                                          [192, 128, 128], [224, 224, 192]]


def test_pad_to_declared_size_and_crop_png_back(files, tmp_path):
    d = files["dir"]
    legacy = NET.replace('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n', "")
    legacy = 'input: "data" input_shape { dim: 1 dim: 3 dim: 16 dim: 20 }\n' + legacy.replace(
        "dim: 8 dim: 8", "dim: 16 dim: 20")
    (d / "padded.prototxt").write_text(legacy)
    np.save(d / "aux16.npy", np.zeros((1, 5, 16, 20), np.float32))
    assert main(["run", str(d / "padded.prototxt"), "--weights", str(d / "w.caffemodel"),
                 "--set", "CLASSES=5", "--input", f"data={d / 'img.png'}", "--input",
                 f"aux={d / 'aux16.npy'}", "--pad", "--output", "score", "--save",
                 str(d / "p.png"), "--output", "score", "--save", str(d / "p.npy")]) == 0
    scores = np.load(d / "p.npy")
    assert scores.shape == (1, 5, 16, 20)
    padded = np.zeros((1, 3, 16, 20), np.float32)
    padded[:, :, :13, :17] = files["data"]
    with torch.no_grad():
        want = files["net"].forward(outputs=["score"], data=torch.from_numpy(padded),
                                    aux=torch.zeros(1, 5, 16, 20))["score"]
    np.testing.assert_allclose(scores, want.numpy(), rtol=1e-6, atol=1e-5)
    with Image.open(d / "p.png") as image:
        assert image.size == (17, 13)
        np.testing.assert_array_equal(np.asarray(image), scores[0].argmax(0)[:13, :17])


def test_mean_option(files):
    d = files["dir"]
    assert cli(files, "--mean", "0,0,0", "--output", "score", "--save", str(d / "s.npy")) == 0
    raw = files["dir"] / "img.png"
    with Image.open(raw) as image:
        bgr = np.asarray(image)[:, :, ::-1].astype(np.float32).transpose(2, 0, 1)[None].copy()
    with torch.no_grad():
        want = files["net"].forward(outputs=["score"], data=torch.from_numpy(bgr),
                                    aux=torch.from_numpy(files["aux"]))["score"]
    np.testing.assert_allclose(np.load(d / "s.npy"), want.numpy(), rtol=1e-6, atol=1e-5)


def test_summary_without_save(files, capsys):
    assert cli(files) == 0
    assert capsys.readouterr().out.startswith("fused (1, 5, 13, 17) min ")


@pytest.mark.parametrize("extra, message", [
    (["--input", "nope=x.npy"], r"'nope' is not an input of the net \(inputs: data, aux\)"),
    (["--save", "out.txt"], r"unknown output format \.txt"),
    (["--output", "score", "--output", "fused", "--save", "a.npy"],
     r"1 --save file\(s\) for 2 output\(s\)"),
    (["--output", "nothing"], r"no blob named 'nothing'"),
    (["--mean", "1,2"], r"--mean takes 1 or 3 values"),
])
def test_errors(files, capsys, extra, message, monkeypatch):
    monkeypatch.chdir(files["dir"])
    assert cli(files, *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("segaware-caffe run: error: ")
    import re
    assert re.search(message, err), err


def test_missing_input_is_fed_zeros_at_the_image_size(files, capsys):
    d = files["dir"]
    assert main(["run", str(d / "net.prototxt"), "--weights", str(d / "w.caffemodel"),
                 "--set", "CLASSES=5", "--input", f"data={d / 'img.png'}",
                 "--output", "fused", "--save", str(d / "f.npy")]) == 0
    assert "no --input for 'aux'; fed zeros of shape (1, 5, 13, 17)" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(d / "f.npy"), reference(files)["score"].numpy(),
                               rtol=1e-6, atol=1e-5)
