"""Golden .caffemodel / .solverstate files load exactly; written files load back the same."""
import numpy as np
import pytest

from segaware_caffe.caffe_proto import (array_to_blob, blob_to_array, caffe_pb2, read_blob, read_net,
                         read_solverstate, read_weights, weights_to_arrays, write_blob,
                         write_solverstate, write_weights)
from tests.conftest import GOLDEN


def _cases(pattern):
    return sorted(GOLDEN.glob(pattern))


def _expected(case_dir, file_name):
    """{layer: [arrays]} from data.npz for the given weights file of the case."""
    data = np.load(case_dir / "data.npz")
    expected = {}
    for key in data.files:
        parts = key.split("/")
        if parts[0] != "param":
            continue
        if file_name == "init.caffemodel":  # solver cases: param/<layer>/<i>/<t>, t = 0 is init
            if len(parts) != 4 or parts[3] != "0":
                continue
        elif file_name.startswith("snap_iter_"):
            step = file_name[len("snap_iter_"):].split(".")[0]
            if len(parts) != 4 or parts[3] != step:
                continue
        elif len(parts) != 3:
            continue
        expected.setdefault(parts[1], {})[int(parts[2])] = data[key]
    return {layer: [blobs[i] for i in sorted(blobs)] for layer, blobs in expected.items()}


def test_every_golden_caffemodel_loads_with_exact_values(tmp_path):
    files = _cases("*/*/*.caffemodel")
    assert len(files) >= 30
    checked = 0
    for path in files:
        net = read_weights(path)
        arrays = weights_to_arrays(net)
        expected = _expected(path.parent, path.name)
        if path.parts[-3] == "nets":  # embs_deploy stores its parameters only in the caffemodel
            assert arrays and not expected
        else:
            assert set(arrays) == set(expected), path
        for layer, blobs in expected.items():
            assert len(arrays[layer]) == len(blobs), (path, layer)
            for got, want in zip(arrays[layer], blobs):
                assert got.dtype == np.float32 and got.shape == want.shape, (path, layer)
                assert np.array_equal(got, want), (path, layer)
                checked += 1
        # write the arrays back (with types) and read them again: identical values
        layer_types = {layer.name: layer.type for layer in net.layer}
        out = tmp_path / f"{path.parent.name}_{path.name}"
        write_weights(arrays, out, types=layer_types)
        again = read_weights(out)
        assert [l.type for l in again.layer] == [layer_types[n] for n in arrays]
        for layer, blobs in weights_to_arrays(again).items():
            for got, want in zip(blobs, arrays[layer]):
                assert got.shape == want.shape and np.array_equal(got, want)
        # and a NetParameter re-serialises to the same bytes
        out2 = tmp_path / f"{path.parent.name}_{path.name}.2"
        write_weights(read_weights(path), out2)
        assert out2.read_bytes() == caffe_pb2.NetParameter.FromString(out2.read_bytes()).SerializeToString()
    assert checked > 100


def test_weights_match_the_net_layer_names():
    for path in _cases("layers/*/weights.caffemodel"):
        net = read_net(path.parent / "net.prototxt")
        names = {layer.name for layer in net.layer}
        assert set(weights_to_arrays(read_weights(path))) <= names


def test_solverstate_loads_history(golden, tmp_path):
    case = golden / "solver" / "sgd_step_momentum_wd"
    state = read_solverstate(case / "snap_iter_2.solverstate")
    assert state.iter == 2 and state.learned_net == "snap_iter_2.caffemodel"
    params = [blob for layer in read_weights(case / state.learned_net).layer
              for blob in layer.blobs]
    # SGD: one momentum blob per learnable parameter, same shapes, in learnable order
    assert len(state.history) == len(params) > 0
    for history, param in zip(state.history, params):
        assert blob_to_array(history).shape == blob_to_array(param).shape
        assert np.isfinite(blob_to_array(history)).all()
    assert any(np.abs(blob_to_array(h)).max() > 0 for h in state.history)
    out = tmp_path / "copy.solverstate"
    write_solverstate(state, out)
    assert read_solverstate(out) == state
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_solverstate(state, out)
    write_solverstate(state, out, overwrite=True)


def test_binaryproto_mean_file_round_trip(tmp_path):
    mean = np.arange(3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5) / 7
    path = tmp_path / "mean.binaryproto"
    write_blob(mean, path)
    got = read_blob(path)
    assert got.dtype == np.float32 and np.array_equal(got, mean)
    # old mean files carry num/channels/height/width instead of shape
    legacy = caffe_pb2.BlobProto(num=1, channels=3, height=4, width=5)
    legacy.data.extend(mean.ravel().tolist())
    assert np.array_equal(read_blob(legacy.SerializeToString()), mean)
    # double_data blobs give float64
    double = array_to_blob(mean.astype(np.float64), double=True)
    assert read_blob(double.SerializeToString()).dtype == np.float64


def test_write_never_overwrites_by_default(tmp_path):
    path = tmp_path / "w.caffemodel"
    write_weights({"conv": [np.ones((2, 1, 3, 3)), np.zeros(2)]}, path)
    with pytest.raises(FileExistsError, match="w.caffemodel: file exists; pass overwrite=True"):
        write_weights({"conv": [np.ones(1)]}, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_blob(np.ones(3), path)
    write_weights({"conv": [np.full(3, 2.0)]}, path, overwrite=True)
    assert np.array_equal(weights_to_arrays(read_weights(path))["conv"][0], np.full(3, 2.0))


def test_torch_tensors_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    weight = torch.nn.Parameter(torch.randn(4, 3))
    path = tmp_path / "t.caffemodel"
    write_weights({"ip": [weight]}, path)
    assert np.array_equal(weights_to_arrays(read_weights(path))["ip"][0], weight.detach().numpy())


def test_array_to_blob_data_diff_double_and_scalar():
    data = np.random.RandomState(1).randn(3, 4, 5).astype(np.float32)
    blob = array_to_blob(data, diff=2 * data)
    assert list(blob.shape.dim) == [3, 4, 5]
    assert np.array_equal(blob_to_array(blob), data)
    assert np.array_equal(blob_to_array(blob, diff=True), 2 * data)
    double = array_to_blob(data.astype(np.float64), double=True)
    assert not len(double.data) and blob_to_array(double).dtype == np.float64
    scalar = array_to_blob(np.float32(3.5))
    assert scalar.HasField("shape") and not len(scalar.shape.dim)  # as Caffe writes 0-axis blobs
    assert blob_to_array(scalar).shape == () and blob_to_array(scalar) == 3.5
    # the fast path writes the same bytes as protobuf's own packed encoding
    reference = caffe_pb2.BlobProto()
    reference.shape.dim.extend([3, 4, 5])
    reference.data.extend(data.ravel().tolist())
    assert array_to_blob(data).SerializeToString() == reference.SerializeToString()
    with pytest.raises(ValueError, match=r"diff shape \(2,\) differs from data shape \(3, 4, 5\)"):
        array_to_blob(data, diff=np.ones(2))
