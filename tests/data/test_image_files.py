"""Images and arrays read from files the user names: decompression bombs, broken and truncated
images, lying .npy headers are DataErrors naming the file (and for a data layer the list line),
never PIL's DecompressionBombError, a SyntaxError or gigabytes of memory."""
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from segaware_caffe import BuildContext, NetBuildError, caffe_proto
from segaware_caffe.data import DataError, WORKERS_ENV, read_image
from segaware_caffe.data.arrays import read_npy
from segaware_caffe.data.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, open_image
from segaware_caffe.layer import layer_class
from segaware_caffe.tools.cli import main


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width, height, idat=b""):
    """A few hundred bytes of PNG whose header claims width x height RGB pixels."""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(idat)) + chunk(b"IEND", b""))


def png_bytes(array, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def picture():
    return np.random.default_rng(0).integers(0, 256, (11, 13, 3), dtype=np.uint8)


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (20_000, 20_000), (9_000, 8_000)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # not even Pillow's DecompressionBombWarning
        with pytest.raises(DataError, match=rf"^{path}: the image is {width} x {height} = "
                                            rf"{width * height:,} pixels, over the limit of "
                                            rf"{DEFAULT_MAX_PIXELS:,} pixels .*\$SEGAWARE_MAX_IMAGE_PIXELS"):
            read_image(path, color=True)


def test_the_limit_can_be_raised_on_request(tmp_path, monkeypatch, picture):
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes(picture))
    with pytest.raises(DataError, match=r"11 x 13|13 x 11"):
        read_image(path, True, max_pixels=100)
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    with pytest.raises(DataError, match=r"13 x 11 = 143 pixels, over the limit of 100 pixels"):
        read_image(path, True)
    monkeypatch.setenv(MAX_PIXELS_ENV, "200")
    assert read_image(path, True).shape == (11, 13, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(DataError, match=r"\$SEGAWARE_MAX_IMAGE_PIXELS must be a positive number of "
                                        r"pixels, got 'lots'"):
        read_image(path, True)


def test_above_pillows_own_limit_when_asked(tmp_path, monkeypatch):
    # a genuine image over twice Pillow's limit: Pillow alone would raise DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes(np.full((6, 7, 3), 9, np.uint8)))
    assert read_image(path, True, max_pixels=1000).shape == (6, 7, 3)
    assert Image.MAX_IMAGE_PIXELS == 10      # Pillow's setting is left as it was


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_every_truncation_is_a_data_error(tmp_path, picture, fmt):
    data = png_bytes(picture, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    for cut in list(range(0, 64, 5)) + list(range(64, len(data), max(1, len(data) // 12))):
        path.write_bytes(data[:cut])
        try:
            image = read_image(path, True)
        except DataError as e:
            assert str(e).startswith(f"{path}: "), e
        else:   # a few formats decode a cut tail as padding, like OpenCV
            assert image.shape == picture.shape, cut


@pytest.mark.parametrize("content, message", [
    (b"", r"not an image file of a supported format"),
    (b"hello world, not an image", r"not an image file of a supported format \(PNG, JPEG"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", r"not an image file of a supported format"),
    (png_claiming(0, 5), r"broken PNG image header"),
    (png_claiming(4, 4, b"\0" * 5), r"broken or truncated PNG image \(OSError: image file is truncated"),
    (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", b"\0" * 5), r"broken image header \(ValueError: Truncated IHDR chunk\)"),
])
def test_broken_images(tmp_path, content, message):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: {message}"):
        read_image(path, True)


def test_corrupt_png_chunk_is_not_a_syntax_error(tmp_path, picture):
    data = bytearray(png_bytes(picture))
    data[40] ^= 0xFF        # inside IDAT: a CRC mismatch, which Pillow raises as SyntaxError
    path = tmp_path / "crc.png"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^{path}: broken PNG image header"):
        read_image(path, True)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}/none.png: no such image file$"):
        read_image(tmp_path / "none.png", True)
    with pytest.raises(DataError, match=rf"^{tmp_path}: cannot open the image: Is a directory"):
        read_image(tmp_path, True)


def test_bytes_and_grayscale(picture):
    data = png_bytes(picture)
    np.testing.assert_array_equal(read_image(data, True), picture[:, :, ::-1])
    assert read_image(data, False).shape == (11, 13)
    with pytest.raises(DataError, match=r"^datum 7: not an image file"):
        read_image(b"junk", True, name="datum 7")
    with open_image(data, load=False) as image:
        assert image.size == (13, 11)


# ---------------------------------------------------------------------------- .npy
def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_npy_round_trip(tmp_path):
    for array in (np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.asfortranarray(np.eye(3)),
                  np.zeros((0, 3), np.int16), np.array(True)):
        path = tmp_path / "a.npy"
        path.write_bytes(npy_bytes(array))
        got = read_npy(path)
        assert got.dtype == array.dtype and np.array_equal(got, array)


@pytest.mark.parametrize("make, message", [
    (lambda: npy_bytes(np.zeros((4, 4), np.float32))[:-10],
     r"the header declares a float32 array of shape \(4, 4\) \(64 bytes\) but only 54 bytes follow"),
    (lambda: npy_bytes(np.zeros(3)).replace(b"(3,)", b"(999999999999,)").replace(b"  ", b"", 0),
     r"the header declares a float64 array of shape \(999999999999,\) \(7,999,999,999,992 bytes\) "
     r"but only \d+ bytes follow"),
    (lambda: npy_bytes(np.zeros(3)).replace(b"(3,)", b"(-3,)"), r"broken \.npy header|negative dimension"),
    (lambda: b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'", r"broken \.npy header"),
    (lambda: b"not numpy at all", r"not a \.npy file"),
    (lambda: npy_bytes(np.array([{"a": 1}], dtype=object)), r"holds object values; expected a numeric array"),
    (lambda: npy_bytes(np.zeros(2, np.complex64)), r"holds complex64 values"),
])
def test_lying_npy_files(tmp_path, make, message):
    path = tmp_path / "a.npy"
    path.write_bytes(make())
    with pytest.raises(DataError, match=rf"^{path}: {message}"):
        read_npy(path)


# ---------------------------------------------------------------------------- where they are used
def test_run_reports_a_bomb_and_a_broken_image(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }\n'
                   'layer { name: "r" type: "ReLU" bottom: "data" top: "out" }\n')
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(50_000, 50_000))
    assert main(["run", str(net), "--input", f"data={bomb}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"segaware-caffe run: error: {bomb}: the image is 50000 x 50000 = 2,500,000,000 "
                   f"pixels, over the limit of 67,108,864 pixels (a decompression bomb, or a genuine "
                   f"huge image: raise the limit with $SEGAWARE_MAX_IMAGE_PIXELS, max_pixels=, or "
                   f"--max-image-pixels)")
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(np.zeros((5, 6, 3), np.uint8)))
    assert main(["run", str(net), "--input", f"data={small}", "--max-image-pixels", "20"]) == 1
    assert "6 x 5 = 30 pixels, over the limit of 20 pixels" in capsys.readouterr().err
    cut = tmp_path / "cut.png"
    noise = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    cut.write_bytes(png_bytes(noise)[:400])
    assert main(["run", str(net), "--input", f"data={cut}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"segaware-caffe run: error: {cut}: broken") and "Traceback" not in err
    lying = tmp_path / "x.npy"
    lying.write_bytes(npy_bytes(np.zeros((1, 3, 4, 4), np.float32))[:-8])
    assert main(["run", str(net), "--input", f"data={lying}"]) == 1
    assert "but only 184 bytes follow" in capsys.readouterr().err


def build_seg_layer(source, root):
    text = f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
        transform_param {{ crop_size: 5 }}
        image_data_param {{ root_folder: "{root}" source: "{source}" batch_size: 1 label_type: PIXEL }} }}'''
    layer_param = caffe_proto.read_net(text).layer[0]
    ctx = BuildContext(name="data", type="ImageSegData", phase="TEST", bottom_shapes=[],
                       bottom_names=[], top_names=list(layer_param.top))
    return layer_class("ImageSegData").from_proto(layer_param, ctx)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_data_layers_report_bombs_with_the_list_line(tmp_path, monkeypatch, workers):
    monkeypatch.setenv(WORKERS_ENV, workers)
    good = np.zeros((6, 6, 3), np.uint8)
    (tmp_path / "a.png").write_bytes(png_bytes(good))
    (tmp_path / "a_label.png").write_bytes(png_bytes(good[:, :, 0]))
    (tmp_path / "bomb.png").write_bytes(png_claiming(30_000, 30_000))
    (tmp_path / "list.txt").write_text("/a.png /a_label.png\n/bomb.png /a_label.png\n")
    layer = build_seg_layer(tmp_path / "list.txt", tmp_path)
    layer()
    with pytest.raises(DataError) as info:
        layer()
    message = str(info.value)
    assert message.startswith("data (ImageSegData): list ") and ", line 2 " in message
    assert f"cannot read image '{tmp_path}/bomb.png': the image is 30000 x 30000" in message
    assert "Traceback" not in message and "Caught" not in message   # not the worker's traceback
    layer.close()


def test_data_layer_bomb_at_build_is_a_net_build_error(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(30_000, 30_000))
    (tmp_path / "list.txt").write_text("/bomb.png /bomb.png\n")
    text = f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
        image_data_param {{ root_folder: "{tmp_path}" source: "{tmp_path}/list.txt" label_type: PIXEL }} }}'''
    layer_param = caffe_proto.read_net(text).layer[0]
    ctx = BuildContext(name="data", type="ImageSegData", phase="TEST", top_names=["data", "label"])
    with pytest.raises(NetBuildError, match=r"line 1 .*over the limit of 67,108,864 pixels"):
        layer_class("ImageSegData").from_proto(layer_param, ctx)


def test_eval_reports_a_broken_label_png(tmp_path, capsys):
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((3, 3), np.uint8), mode="L").save(tmp_path / folder / "a.png")
    (tmp_path / "gt" / "a.png").write_bytes(png_claiming(40_000, 40_000))
    (tmp_path / "ids.txt").write_text("a\n")
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--list", str(tmp_path / "ids.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"segaware-caffe eval: error: {tmp_path}/gt/a.png: the image is 40000 x 40000")
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--list", str(tmp_path / "ids.txt"), "--num-classes", "100000000"]) == 1
    assert "--num-classes must be in 1..4096" in capsys.readouterr().err
    (tmp_path / "ids.bin").write_bytes(b"\xff\xfe\x00")
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--list", str(tmp_path / "ids.bin")]) == 1
    assert "ids.bin: not a text list of image ids" in capsys.readouterr().err
