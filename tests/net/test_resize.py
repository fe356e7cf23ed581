"""Deploy nets that hard-code sizes tied to their input, moved to another height and width:
resize_deploy's rule on a net written here, the released vgg/res/embs deploy nets at 353x353 and
161x241, sizes that cannot work, and the `resize` verb and --input-shape of run / time / export."""
import re

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import caffe_proto
from segaware_caffe.canonical import declared_inputs
from segaware_caffe.errors import NetBuildError
from segaware_caffe.resize import main_input_size, resize_deploy, resize_to_inputs
from segaware_caffe.tools.cli import main

# sizes tied to a 65 x 65 input: the full size (Interp, Tile), half of it (a 33 x 33 input, a
# DummyData map), and a 3 x 3 kernel-sized input that belongs to no image size
TIED = """
name: "tied"
input: "data" input_shape { dim: 1 dim: 2 dim: 65 dim: 65 }
input: "half" input_shape { dim: 1 dim: 2 dim: 33 dim: 33 }
input: "patch" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
layer { name: "up" type: "Interp" bottom: "half" top: "up" interp_param { height: 65 width: 65 } }
layer { name: "sum" type: "Eltwise" bottom: "up" bottom: "data" top: "sum" }
layer { name: "xy" type: "DummyData" top: "xy"
        dummy_data_param { shape { dim: 1 dim: 2 dim: 33 dim: 33 } data_filler { type: "xy" } } }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "mix" type: "Eltwise" bottom: "pool" bottom: "xy" top: "mix" }
layer { name: "mean" type: "Pooling" bottom: "data" top: "mean" pooling_param { pool: AVE global_pooling: true } }
layer { name: "rows" type: "Tile" bottom: "mean" top: "rows" tile_param { axis: 2 tiles: 65 } }
layer { name: "cols" type: "Tile" bottom: "rows" top: "cols" tile_param { axis: -1 tiles: 65 } }
layer { name: "again" type: "Eltwise" bottom: "cols" bottom: "data" top: "again" }
layer { name: "p" type: "Pooling" bottom: "patch" top: "p" pooling_param { pool: AVE kernel_size: 3 } }
"""


def tied_net():
    return caffe_proto.read_net(TIED)


def values(param):
    layers = {layer.name: layer for layer in param.layer}
    return (declared_inputs(param), layers["up"].interp_param.height, layers["up"].interp_param.width,
            list(layers["xy"].dummy_data_param.shape[0].dim),
            (layers["rows"].tile_param.tiles, layers["cols"].tile_param.tiles))


def test_tied_constants_follow_height_and_width():
    # 65 -> 33 rows, 49 columns: (v - 1) * (S - 1) / 64 + 1
    inputs, height, width, xy, tiles = values(resize_deploy(tied_net(), (33, 49)))
    assert inputs == {"data": (1, 2, 33, 49), "half": (1, 2, 17, 25), "patch": (1, 2, 3, 3)}
    assert (height, width, xy, tiles) == (33, 49, [1, 2, 17, 25], (33, 49))
    net = sc.Net(resize_deploy(tied_net(), (33, 49)))
    assert net.blob_shapes["mix"] == (1, 2, 17, 25) and net.blob_shapes["again"] == (1, 2, 33, 49)
    assert main_input_size(resize_deploy(tied_net(), 129)) == (129, 129)
    # legacy net-level inputs became an Input layer; the original is untouched
    assert tied_net().input == ["data", "half", "patch"]


def test_sizes_where_a_tied_constant_is_not_whole_are_refused():
    with pytest.raises(NetBuildError, match=r"cannot run at input width 24: input 'half' dim 3 is "
                                            r"33 at the declared width 65, which would become "
                                            r"12.5; input widths with width - 1 a multiple of 2 "
                                            r"work \(nearest: 23, 25\)"):
        resize_deploy(tied_net(), (33, 24))
    with pytest.raises(NetBuildError, match="sizes must be >= 1"):
        resize_deploy(tied_net(), (0, 5))


def test_resize_to_inputs_only_when_the_first_input_changes():
    same, resized = resize_to_inputs(tied_net(), {"data": (2, 2, 65, 65)})
    assert not resized and declared_inputs(same)["data"] == (2, 2, 65, 65)
    moved, resized = resize_to_inputs(tied_net(), {"data": (1, 2, 97, 33)})
    assert resized and declared_inputs(moved)["half"] == (1, 2, 49, 17)


RELEASED = [("vgg", 353), ("vgg", (161, 241)), ("embs", 353), ("embs", (161, 241)),
            pytest.param("res", 353, marks=pytest.mark.slow),
            pytest.param("res", (161, 241), marks=pytest.mark.slow)]


@pytest.mark.parametrize("name, size", RELEASED, ids=lambda v: str(v))
def test_released_deploy_nets_build_at_other_sizes(reference, name, size):
    param = caffe_proto.read_net(reference / "segaware" / "config" / name / "deploy.prototxt")
    height, width = (size, size) if isinstance(size, int) else size
    net = sc.Net(resize_deploy(param, size), fuse=False)
    first = next(iter(net.input_shapes.values()))
    assert tuple(first[2:]) == (height, width)
    if name == "embs":     # the 13x13 position patch is a kernel's extent: kept
        assert net.input_shapes["pos_data"] == (1, 3, 13, 13)
    out = {"vgg": "fc8_interp", "res": "crf_interp", "embs": "weighted_avg"}[name]
    assert net.blob_shapes[out][2:] == (height, width)


def test_released_vgg_deploy_runs_at_161x241(reference):
    param = caffe_proto.read_net(reference / "segaware/config/vgg/deploy.prototxt")
    torch.manual_seed(0)
    net = sc.Net(resize_deploy(param, (161, 241)))
    with torch.no_grad():
        out = net.forward(data=torch.randn(1, 3, 161, 241), label=torch.zeros(1, 1, 161, 241))
    assert out["fc8_interp"].shape == (1, 21, 161, 241)


def test_res_deploy_at_an_impossible_size_names_the_sizes_that_work(reference):
    param = caffe_proto.read_net(reference / "segaware/config/res/deploy.prototxt")
    with pytest.raises(NetBuildError, match=r"input heights with height - 1 a multiple of 8 work "
                                            r"\(nearest: 297, 305\)"):
        resize_deploy(param, 300)


# ---------------------------------------------------------------------------- the command line
def test_resize_verb(tmp_path, capsys):
    (tmp_path / "tied.prototxt").write_text(TIED)
    out = tmp_path / "small.prototxt"
    assert main(["resize", str(tmp_path / "tied.prototxt"), "--size", "33x49", "-o", str(out)]) == 0
    assert "input 65x65 -> 33x49 (height x width); inputs data 1x2x33x49, half 1x2x17x25" in \
        capsys.readouterr().out
    assert values(caffe_proto.read_net(out))[1:] == (33, 49, [1, 2, 17, 25], (33, 49))
    assert main(["resize", str(tmp_path / "tied.prototxt"), "--size", "9", "-o", str(out)]) == 1
    assert "small.prototxt: file exists; pass --force" in capsys.readouterr().err
    assert main(["resize", str(tmp_path / "tied.prototxt"), "--input-shape", "data=1,2,17,17",
                 "-o", str(out), "--force"]) == 0
    assert values(caffe_proto.read_net(out))[0]["half"] == (1, 2, 9, 9)
    for bad, message in (("9x", "--size expects HEIGHT or HEIGHTxWIDTH, got '9x'"),
                         ("33x24", "cannot run at input width 24")):
        assert main(["resize", str(tmp_path / "tied.prototxt"), "--size", bad, "-o",
                     str(tmp_path / "x.prototxt")]) == 1
        assert message in capsys.readouterr().err


def test_time_and_run_follow_the_input_shape(tmp_path, capsys):
    (tmp_path / "tied.prototxt").write_text(TIED)
    assert main(["time", "--model", str(tmp_path / "tied.prototxt"), "--iterations", "1",
                 "--input-shape", "data=1,2,33,49"]) == 0
    assert re.search(r"\] +up\tforward: ", capsys.readouterr().err)
    np.save(tmp_path / "x.npy", np.ones((1, 2, 41, 25), np.float32))
    assert main(["run", str(tmp_path / "tied.prototxt"), "--input", f"data={tmp_path}/x.npy",
                 "--output", "again", "--output", "mix"]) == 0
    out = capsys.readouterr()
    assert "again (1, 2, 41, 25)" in out.out and "mix (1, 2, 21, 13)" in out.out
    assert "no --input for 'half'; fed zeros of shape (1, 2, 21, 13)" in out.err
    assert main(["run", str(tmp_path / "tied.prototxt"), "--input", f"data={tmp_path}/x.npy",
                 "--input-shape", "data=1,2,41,25", "--output", "again"]) == 0
    assert "again (1, 2, 41, 25)" in capsys.readouterr().out
    # arrays are fed as they are: only images are padded to --input-shape
    assert main(["run", str(tmp_path / "tied.prototxt"), "--input", f"data={tmp_path}/x.npy",
                 "--input-shape", "data=1,2,65,65", "--output", "again"]) == 1
    assert ("--input data: the array has shape (1, 2, 41, 25), the net is built for (1, 2, 65, 65)"
            in capsys.readouterr().err)


CONV_NET = """
name: "convs"
input: "data" input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
input: "unused" input_shape { dim: 1 dim: 1 dim: 16 dim: 16 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "silence" type: "Silence" bottom: "unused" }
"""


def test_exported_module_takes_its_weights_path_any_size_and_only_used_inputs(tmp_path, capsys):
    from segaware_caffe.converters.python_export import load_source
    (tmp_path / "net.prototxt").write_text(CONV_NET)
    torch.manual_seed(0)
    net = sc.Net(str(tmp_path / "net.prototxt"))
    net.save_weights(tmp_path / "w.caffemodel")
    assert main(["convert", str(tmp_path / "net.prototxt"), str(tmp_path / "w.caffemodel"),
                 "-o", str(tmp_path / "w.safetensors")]) == 0
    assert main(["export", str(tmp_path / "net.prototxt"), str(tmp_path / "w.safetensors"),
                 "--python", str(tmp_path / "m.py")]) == 0
    out = capsys.readouterr().out
    assert "forward(data)" in out and f"load({str(tmp_path / 'w.safetensors')!r})" in out
    source = (tmp_path / "m.py").read_text()
    assert "DEFAULT_WEIGHTS = None" in source and str(tmp_path) not in source
    module = load_source(source, filename=str(tmp_path / "m.py"))
    model = module.load(str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 23, 18)                 # not the declared 1 x 3 x 16 x 16
    with torch.no_grad():
        got = model(x)
        ref = net.forward(data=x, unused=torch.zeros(2, 1, 23, 18))
    assert set(got) == {"pool"} and set(ref) == {"pool"}
    torch.testing.assert_close(got["pool"], ref["pool"], rtol=1e-5, atol=1e-6)
    # with a .caffemodel the tensors go next to the module, which finds them from its own folder
    assert main(["export", str(tmp_path / "net.prototxt"), str(tmp_path / "w.caffemodel"),
                 "--python", str(tmp_path / "n.py")]) == 0
    capsys.readouterr()
    source = (tmp_path / "n.py").read_text()
    assert "os.path.join(os.path.dirname(os.path.abspath(__file__)), 'n.safetensors')" in source
    assert str(tmp_path) not in source
    model = load_source(source, filename=str(tmp_path / "n.py")).load()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["pool"], ref["pool"], rtol=1e-5, atol=1e-6)
    # the tensor file beside it is checked before anything is written
    (tmp_path / "n3.safetensors").write_bytes(b"mine")
    assert main(["export", str(tmp_path / "net.prototxt"), str(tmp_path / "w.caffemodel"),
                 "--python", str(tmp_path / "n3.py")]) == 1
    assert "n3.safetensors: file exists; pass --force" in capsys.readouterr().err
    assert not (tmp_path / "n3.py").exists()


def test_export_input_shape_moves_a_tied_net(tmp_path, capsys):
    (tmp_path / "tied.prototxt").write_text(TIED)
    assert main(["export", str(tmp_path / "tied.prototxt"), "--python", str(tmp_path / "t.py"),
                 "--input-shape", "data=1,2,33,49"]) == 0
    capsys.readouterr()
    source = (tmp_path / "t.py").read_text()
    assert "height=33, width=49" in source and "'data' (1, 2, 33, 49)" in source
    assert "Inputs no layer reads are left out: 'patch'" not in source    # p reads it
