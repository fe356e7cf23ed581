"""MatWrite / MatRead: .mat layout (MATLAB dims W,H,C,N), file naming, period, no-overwrite."""
import os

import numpy as np
import pytest
import scipy.io
import torch

from segaware_caffe import caffe_proto
from segaware_caffe import BuildContext, NetBuildError
from segaware_caffe.data import DataError
from segaware_caffe.layer import layer_class


def build(text, bottom_shapes=(), overwrite=False, tops=()):
    layer_param = caffe_proto.read_net(text).layer[0]
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase="TEST",
                       bottom_shapes=[tuple(s) for s in bottom_shapes],
                       bottom_names=list(layer_param.bottom), top_names=list(layer_param.top),
                       overwrite=overwrite)
    return layer_class(layer_param.type).from_proto(layer_param, ctx)


def mat_write(prefix, source="", strip=0, period=1, bottoms=("fc8",), shapes=((2, 3, 4, 5),),
              overwrite=False):
    bottom_text = " ".join(f'bottom: "{b}"' for b in bottoms)
    source_text = f'source: "{source}"' if source else ""
    return build(f'''layer {{ name: "fc8_mat" type: "MatWrite" {bottom_text}
        mat_write_param {{ prefix: "{prefix}" {source_text} strip: {strip} period: {period} }} }}''',
                 bottom_shapes=shapes, overwrite=overwrite)


@pytest.fixture(autouse=True)
def output_folder(tmp_path, monkeypatch):
    """MatWrite writes only inside the working directory (or $SEGAWARE_OUTPUT_DIR)."""
    monkeypatch.delenv("SEGAWARE_OUTPUT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ids(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("2008_000006.jpg\n2008_000011.jpg\n\n2008_000012.jpg\n")
    (tmp_path / "out").mkdir()
    return path


def test_round_trip_matlab_layout(tmp_path, ids):
    layer = mat_write(f"{tmp_path}/out/", source=ids, strip=4, bottoms=("a", "b"),
                      shapes=((2, 3, 4, 5), (1, 2)))
    first = torch.randn(2, 3, 4, 5, requires_grad=True)
    second = torch.randn(1, 2, dtype=torch.float64)
    assert layer(first, second) == ()
    saved = scipy.io.loadmat(tmp_path / "out" / "2008_000006_blob_0.mat")["data"]
    assert saved.dtype == np.float32 and saved.shape == (5, 4, 3, 2)
    blob = first.detach().numpy()
    for n, c, h, w in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 2, 3), (1, 0, 3, 1)]:
        assert saved[w, h, c, n] == blob[n, c, h, w]
    np.testing.assert_array_equal(saved, blob.transpose(3, 2, 1, 0))
    # a 2-axis blob (N, C) is (1, 1, C, N) to MATLAB, as Caffe's legacy width/height/channels/num
    small = scipy.io.loadmat(tmp_path / "out" / "2008_000006_blob_1.mat")["data"]
    assert small.shape == (1, 1, 2, 1) and small.dtype == np.float32
    np.testing.assert_array_equal(small[0, 0, :, 0], second.numpy()[0].astype(np.float32))


def test_uncompressed_mat5(tmp_path, ids):
    mat_write(f"{tmp_path}/out/", source=ids)(torch.zeros(2, 3, 4, 5))
    raw = (tmp_path / "out" / "2008_000006.jpg_blob_0.mat").read_bytes()
    assert raw[:6] == b"MATLAB" and raw[126:128] == b"IM"   # level-5 header, little-endian
    assert int.from_bytes(raw[128:132], "little") != 15     # first element not miCOMPRESSED


def test_period_and_names_follow_the_forward_count(tmp_path, ids):
    layer = mat_write(f"{tmp_path}/out/p_", source=ids, strip=4, period=2)
    for _ in range(3):
        layer(torch.zeros(2, 3, 4, 5))
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    # forwards 0 and 2 write, named by source entries 0 and 2 (Caffe indexes by the forward count)
    assert written == ["p_2008_000006_blob_0.mat", "p_2008_000012_blob_0.mat"]


def test_without_source_names_are_iter_k(tmp_path):
    layer = mat_write(f"{tmp_path}/")
    layer(torch.ones(2, 3, 4, 5))
    layer(torch.ones(2, 3, 4, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0_blob_0.mat", "iter_1_blob_0.mat"]


def test_existing_file_is_an_error_unless_overwrite(tmp_path, ids):
    mat_write(f"{tmp_path}/out/", source=ids)(torch.zeros(2, 3, 4, 5))
    again = mat_write(f"{tmp_path}/out/", source=ids)
    with pytest.raises(FileExistsError, match=r"fc8_mat \(MatWrite\): .*2008_000006\.jpg_blob_0"
                                              r"\.mat already exists; remove it or build the net "
                                              r"with overwrite=True"):
        again(torch.ones(2, 3, 4, 5))
    mat_write(f"{tmp_path}/out/", source=ids, overwrite=True)(torch.ones(2, 3, 4, 5))
    saved = scipy.io.loadmat(tmp_path / "out" / "2008_000006.jpg_blob_0.mat")["data"]
    assert (saved == 1).all()


def test_running_past_the_source_is_an_error(tmp_path, ids):
    layer = mat_write(f"{tmp_path}/out/", source=ids)
    for _ in range(3):
        layer(torch.zeros(2, 3, 4, 5))
    with pytest.raises(DataError, match=r"fc8_mat \(MatWrite\): forward 4 needs name 4 of "
                                        r"mat_write_param.source, which has only 3"):
        layer(torch.zeros(2, 3, 4, 5))


def test_missing_directory_warns_at_build_and_fails_at_write(tmp_path, ids):
    with pytest.warns(UserWarning, match=r"fc8_mat \(MatWrite\): output directory "
                                         r"'.*/missing' does not exist"):
        layer = mat_write(f"{tmp_path}/missing/", source=ids)
    with pytest.raises(DataError, match=r"fc8_mat \(MatWrite\): cannot write .*/missing/"
                                        r"2008_000006.jpg_blob_0.mat: directory '.*/missing' "
                                        r"does not exist"):
        layer(torch.zeros(2, 3, 4, 5))


def test_build_errors(tmp_path, ids):
    with pytest.raises(NetBuildError, match=r"strip 20 removes all of '2008_000006.jpg'"):
        mat_write(f"{tmp_path}/out/", source=ids, strip=20)
    with pytest.raises(NetBuildError, match=r"period must be > 0, got 0"):
        mat_write(f"{tmp_path}/out/", period=0)
    with pytest.raises(NetBuildError, match=r"bottom 'fc8' has 5 axes"):
        mat_write(f"{tmp_path}/out/", shapes=((1, 2, 3, 4, 5),))
    with pytest.raises(NetBuildError, match=r"mat_write_param.source 'nope.txt' not found"):
        mat_write(f"{tmp_path}/out/", source="nope.txt")


def test_output_shapes_writes_nothing(tmp_path):
    layer = mat_write(f"{tmp_path}/")
    assert layer.output_shapes([(2, 3, 4, 5)]) == []
    assert list(tmp_path.iterdir()) == [] and layer.iteration == 0


def test_matread_reads_what_matwrite_wrote(tmp_path, ids):
    writer = mat_write(f"{tmp_path}/out/", source=ids, shapes=((1, 3, 4, 5),))
    blobs = [torch.randn(1, 3, 4, 5) for _ in range(3)]
    for blob in blobs:
        writer(blob)
    reader = build(f'''layer {{ name: "in" type: "MatRead" top: "scores"
        mat_read_param {{ prefix: "{tmp_path}/out/" source: "{ids}" batch_size: 2 }} }}''',
                   tops=("scores",))
    assert reader.output_shapes([]) == [(2, 3, 4, 5)]
    first, second = reader(), reader()
    torch.testing.assert_close(first, torch.cat(blobs[:2]), rtol=0, atol=0)
    torch.testing.assert_close(second, torch.cat([blobs[2], blobs[0]]), rtol=0, atol=0)  # wraps


def test_matread_errors(tmp_path, ids):
    with pytest.raises(NetBuildError, match=r"in \(MatRead\): .*2008_000006.jpg_blob_0.mat does "
                                            r"not exist"):
        build(f'''layer {{ name: "in" type: "MatRead" top: "x"
            mat_read_param {{ prefix: "{tmp_path}/out/" source: "{ids}" }} }}''', tops=("x",))
    scipy.io.savemat(tmp_path / "out" / "2008_000006.jpg_blob_0.mat",
                     {"data": np.zeros((5, 4, 3, 1), np.float64)})
    with pytest.raises(NetBuildError, match=r"variable 'data' is float64, expected single"):
        build(f'''layer {{ name: "in" type: "MatRead" top: "x"
            mat_read_param {{ prefix: "{tmp_path}/out/" source: "{ids}" }} }}''', tops=("x",))


def test_matwrite_in_a_net(tmp_path):
    from segaware_caffe import Net
    (tmp_path / "ids.txt").write_text("a\nb\n")
    text = f"""
    layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 1 dim: 2 dim: 3 dim: 4 }} }} }}
    layer {{ name: "w" type: "MatWrite" bottom: "x"
             mat_write_param {{ prefix: "{tmp_path}/" source: "{tmp_path}/ids.txt" }} }}
    """
    net = Net(text)
    assert list(tmp_path.iterdir()) == [tmp_path / "ids.txt"]   # building writes nothing
    x = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    net.forward(x=x)
    saved = scipy.io.loadmat(tmp_path / "a_blob_0.mat")["data"]
    np.testing.assert_array_equal(saved, x.numpy().transpose(3, 2, 1, 0))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        Net(text).forward(x=x)
    Net(text, overwrite=True).forward(x=x + 1)
    saved = scipy.io.loadmat(tmp_path / "a_blob_0.mat")["data"]
    np.testing.assert_array_equal(saved, (x + 1).numpy().transpose(3, 2, 1, 0))


# -- where MatWrite may write ---------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["../x_", "out/../../x_", "out/..", "a\\..\\..\\b"])
def test_prefix_with_dotdot_is_refused(tmp_path, prefix):
    with pytest.raises(NetBuildError, match=r"fc8_mat \(MatWrite\): mat_write_param\.prefix "
                                            r".* contains '\.\.'; \.mat files are written only "
                                            r"inside the output folder"):
        mat_write(prefix)


def test_absolute_prefix_outside_the_output_folder_is_refused(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(NetBuildError, match=rf"mat_write_param\.prefix '{outside}/fc8_' puts files "
                                            rf"at '{outside}/fc8_\*\.mat', outside the output "
                                            rf"folder {tmp_path}/work"):
        mat_write(f"{outside}/fc8_")
    monkeypatch.setenv("SEGAWARE_OUTPUT_DIR", str(outside))   # asked for: allowed
    layer = mat_write(f"{outside}/fc8_")
    layer(torch.zeros(2, 3, 4, 5))
    assert (outside / "fc8_iter_0_blob_0.mat").is_file()


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "work_link")
    os.chdir(tmp_path / "elsewhere")   # the working directory is the output folder...
    (tmp_path / "elsewhere" / "sub").mkdir()
    os.chdir(tmp_path / "elsewhere" / "sub")
    with pytest.raises(NetBuildError, match=r"outside the output folder"):
        mat_write(f"{tmp_path}/work_link/x_")       # ...and the link resolves above it


def test_source_name_escaping_is_refused(tmp_path):
    (tmp_path / "ids.txt").write_text("2008_000006\n../../etc/evil\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(NetBuildError, match=r"mat_write_param\.source name '\.\./\.\./etc/evil' "
                                            r"contains '\.\.'"):
        mat_write("out/", source=tmp_path / "ids.txt")


def test_relative_prefix_inside_is_fine(tmp_path, ids):
    layer = mat_write("out/", source=ids, strip=4)
    layer(torch.zeros(2, 3, 4, 5))
    assert (tmp_path / "out" / "2008_000006_blob_0.mat").is_file()
