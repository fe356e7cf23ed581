"""caffemodel -> safetensors/.pt -> caffemodel is bit-identical for every golden weights file."""
import json

import pytest
import torch

from segaware_caffe import caffe_proto
from segaware_caffe.converters import caffemodel as cm
from tests.conftest import GOLDEN
from segaware_caffe.tools.cli import main

WEIGHTS = sorted(GOLDEN.glob("*/*/*.caffemodel")) 


def case_of(weights):
    meta = json.loads((weights.parent / "meta.json").read_text())
    return weights.parent / "net.prototxt", meta["phase"].lower(), meta.get("variables") or {}


def var_args(variables):
    return [a for k, v in variables.items() for a in ("--var", f"{k}={v}")]


def assert_same_blobs(source_path, back_path):
    source = caffe_proto.read_weights(source_path)
    back = {layer.name: layer for layer in caffe_proto.read_weights(back_path).layer}
    compared = 0
    for layer in source.layer:
        if not len(layer.blobs):
            continue
        other = back[layer.name]
        assert len(other.blobs) == len(layer.blobs), layer.name
        for i, (a, b) in enumerate(zip(layer.blobs, other.blobs)):
            assert caffe_proto.blob_shape(a) == caffe_proto.blob_shape(b), f"{layer.name} blob {i}"
            assert a.HasField("shape") == b.HasField("shape"), f"{layer.name} blob {i}"
            # the whole BlobProto, data bytes and shape fields, serialises identically
            assert a.SerializeToString() == b.SerializeToString(), f"{layer.name} blob {i} differs"
            compared += 1
    assert compared > 0
    return compared


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda p: f"{p.parts[-3]}/{p.parts[-2]}/{p.name}")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_bit_identical(weights, suffix, tmp_path, capsys):
    prototxt, phase, variables = case_of(weights)
    tensors_path, back = tmp_path / f"model{suffix}", tmp_path / "back.caffemodel"
    common = ["--phase", phase, *var_args(variables)]
    assert main(["convert", str(prototxt), str(weights), "-o", str(tensors_path), *common]) == 0
    assert main(["convert", str(prototxt), str(tensors_path), "--to-caffemodel", "-o", str(back),
                 *common]) == 0
    compared = assert_same_blobs(weights, back)
    print(f"{weights.parent.name}/{weights.name}: {compared} blob(s) bit-identical via {suffix}")


def test_names_metadata_and_state_dict(golden, tmp_path):
    case = golden / "layers/scale_scalar_numaxes0"
    out = tmp_path / "m.safetensors"
    metadata, ignored = cm.convert_caffemodel(case / "net.prototxt", case / "weights.caffemodel", out)
    assert ignored == []
    tensors, loaded = cm.load_tensors(out)
    assert loaded == metadata
    assert loaded["net"]["prototxt_sha256"] == cm.prototxt_sha256(case / "net.prototxt")
    layer = loaded["layers"][0]
    assert layer["type"] == "Scale" and len(layer["blobs"]) == 1
    entry = layer["blobs"][0]
    assert "shape" not in entry and "legacy" not in entry  # Caffe wrote a 0-axis blob without shape
    assert tensors[entry["tensor"]].shape == ()
    # the tensors load straight into the Net (state_dict keys under `layers.`)
    net = cm.build_net(case / "net.prototxt")
    missing, unexpected = net.load_state_dict({f"layers.{k}": v for k, v in tensors.items()}, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("layers.")]


def test_plain_state_dict_to_caffemodel(golden, tmp_path):
    case = golden / "layers/innerproduct"
    net = cm.build_net(case / "net.prototxt", phase="train")
    net.load_weights(case / "weights.caffemodel")
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    back = tmp_path / "back.caffemodel"
    _, notes = cm.convert_to_caffemodel(case / "net.prototxt", tmp_path / "sd.pt", back, phase="train")
    assert notes == []
    assert_same_blobs(case / "weights.caffemodel", back)


def test_legacy_shapes_survive(golden, tmp_path):
    """A BVLC-era caffemodel stores a bias as num/channels/height/width 1x1x1xN."""
    case = golden / "layers/innerproduct"
    source = caffe_proto.read_weights(case / "weights.caffemodel")
    for blob in source.layer[0].blobs:
        shape = caffe_proto.blob_shape(blob)
        blob.ClearField("shape")
        for field, dim in zip(cm.LEGACY_FIELDS, (1,) * (4 - len(shape)) + shape):
            setattr(blob, field, dim)
    legacy = tmp_path / "legacy.caffemodel"
    caffe_proto.write_weights(source, legacy)
    net = cm.build_net(case / "net.prototxt")
    tensors, metadata, _ = cm.caffemodel_to_tensors(net, legacy)
    assert tensors["ip.bias"].shape == (7,)
    assert metadata["layers"][0]["blobs"][1]["legacy"] == {"num": 1, "channels": 1, "height": 1, "width": 7}
    cm.save_tensors(tmp_path / "m.safetensors", tensors, metadata)
    cm.convert_to_caffemodel(case / "net.prototxt", tmp_path / "m.safetensors", tmp_path / "back.caffemodel")
    assert_same_blobs(legacy, tmp_path / "back.caffemodel")


def test_never_overwrites_without_force(golden, tmp_path, capsys):
    case = golden / "layers/innerproduct"
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    args = ["convert", str(case / "net.prototxt"), str(case / "weights.caffemodel"), "-o", str(out)]
    assert main(args) == 1
    assert "file exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(args + ["--force"]) == 0
    back = tmp_path / "back.caffemodel"
    back.write_bytes(b"keep me")
    back_args = ["convert", str(case / "net.prototxt"), str(out), "--to-caffemodel", "-o", str(back)]
    assert main(back_args) == 1 and back.read_bytes() == b"keep me"
    assert main(back_args + ["--force"]) == 0


def test_mismatched_weights_name_the_layer(golden, tmp_path, capsys):
    case = golden / "layers/innerproduct"
    text = (case / "net.prototxt").read_text().replace("num_output: 7", "num_output: 6")
    assert "num_output: 6" in text
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(text)
    assert main(["convert", str(prototxt), str(case / "weights.caffemodel"), "-o",
                 str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "layer ip (InnerProduct) blob 0 (weight) has shape (7, 60)" in err and "(6, 60)" in err


def test_missing_tensor_is_an_error(golden, tmp_path):
    case = golden / "layers/innerproduct"
    net = cm.build_net(case / "net.prototxt")
    with pytest.raises(ValueError, match=r"no entry for 1 blob\(s\) of the net: ip.bias"):
        cm.tensors_to_caffemodel(net, {"ip.weight": torch.zeros(7, 60)})
