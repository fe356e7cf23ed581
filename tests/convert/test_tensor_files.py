""".safetensors and .pt inputs of `convert`: a header that lies (lengths, offsets, dtypes, shapes,
JSON), a pickle that is not plain tensors, a cut file: each is a TensorFileError naming the file
and the tensor or field, found before anything is allocated."""
import collections
import json
import pickle
import struct
import zipfile

import pytest
import torch

from segaware_caffe.converters import caffemodel as cm
from segaware_caffe.converters.tensor_files import (check_metadata, read_tensor_file,
                                                    write_tensor_file)
from segaware_caffe.errors import SegawareError, TensorFileError
from segaware_caffe.tools.cli import main

METADATA = {"format": "segaware-caffe-weights", "version": 1,
            "net": {"name": "n", "prototxt_sha256": None, "variables": {}, "phase": "test",
                    "stages": [], "level": 0},
            "layers": [{"name": "ip", "key": "ip", "type": "InnerProduct",
                        "blobs": [{"tensor": "ip.weight", "dtype": "float32", "shape": [3, 2]},
                                  {"tensor": "ip.bias", "dtype": "float32",
                                   "legacy": {"num": 1, "channels": 1, "height": 1, "width": 3}}]}]}


def safetensors_bytes(header, data=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


def write(tmp_path, content, name="m.safetensors"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def good_header():
    return {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F64", "shape": [], "data_offsets": [24, 32]},
            "__metadata__": {"caffe": json.dumps(METADATA)}}


def test_round_trip_and_our_reader_agrees_with_safetensors(tmp_path):
    tensors = {"ip.weight": torch.randn(3, 2), "ip.bias": torch.randn(3, dtype=torch.float64),
               "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"m{suffix}"
        write_tensor_file(path, tensors, METADATA)
        got, metadata = read_tensor_file(path)
        assert metadata == METADATA and set(got) == set(tensors)   # safetensors sorts by dtype
        for name, tensor in tensors.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    from safetensors.torch import load_file
    reference = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(reference[k], got[k]) for k in tensors)


def test_writer_refuses_an_existing_file(tmp_path):
    path = write(tmp_path, b"keep")
    with pytest.raises(FileExistsError, match=r"m\.safetensors: file exists; pass overwrite=True"):
        write_tensor_file(path, {"a": torch.zeros(1)}, METADATA)
    assert path.read_bytes() == b"keep"


def _mutate(header, **changes):
    for name, entry in changes.items():
        header[name] = entry
    return header


SAFETENSORS_CASES = [
    ("too short", b"\x01\x02", r"2 bytes, too short for a safetensors file"),
    ("header length past the end", struct.pack("<Q", 10 ** 12) + b"{}",
     r"header length 1,000,000,000,000 runs past the end of the 10-byte file"),
    ("not JSON", safetensors_bytes(b"{not json"), r"the header is not JSON \(JSONDecodeError"),
    ("not UTF-8", safetensors_bytes(b"\xff\xfe{}"), r"the header is not JSON \(UnicodeDecodeError"),
    ("a list", safetensors_bytes([1, 2]), r"the header is a JSON list, expected an object"),
    ("repeated name", safetensors_bytes(b'{"a": {}, "a": {}}'), r"the header names 'a' twice"),
    ("entry not an object", safetensors_bytes({"a": 3}), r"tensor 'a': entry is a int"),
    ("missing field", safetensors_bytes({"a": {"dtype": "F32"}}),
     r"tensor 'a': entry has no shape, data_offsets"),
    ("unknown dtype", safetensors_bytes(_mutate(good_header(), a={"dtype": "F128", "shape": [2, 3],
                                                                   "data_offsets": [0, 24]}), bytes(32)),
     r"tensor 'a': dtype 'F128' is not one of F64, F32"),
    ("negative dim", safetensors_bytes(_mutate(good_header(), a={"dtype": "F32", "shape": [-2, -3],
                                                                  "data_offsets": [0, 24]}), bytes(32)),
     r"tensor 'a': shape \[-2, -3\] is not a list of non-negative integers"),
    ("huge shape", safetensors_bytes(_mutate(good_header(), a={"dtype": "F32", "shape": [10 ** 9, 10 ** 9],
                                                                "data_offsets": [0, 24]}), bytes(32)),
     r"tensor 'a': shape \[1000000000, 1000000000\] of F32 needs 4,000,000,000,000,000,000 bytes "
     r"but data_offsets \[0, 24\] hold 24"),
    ("shape disagrees", safetensors_bytes(_mutate(good_header(), a={"dtype": "F32", "shape": [2, 2],
                                                                     "data_offsets": [0, 24]}), bytes(32)),
     r"tensor 'a': shape \[2, 2\] of F32 needs 16 bytes but data_offsets \[0, 24\] hold 24"),
    ("offsets past the end", safetensors_bytes(good_header(), bytes(20)),
     r"tensor 'a': data_offsets \[0, 24\] lie outside the 20 data bytes"),
    ("offsets reversed", safetensors_bytes(_mutate(good_header(), a={"dtype": "F32", "shape": [0],
                                                                      "data_offsets": [8, 0]}), bytes(32)),
     r"tensor 'a': data_offsets \[8, 0\] lie outside"),
    ("offsets not integers", safetensors_bytes(_mutate(good_header(), a={"dtype": "F32", "shape": [2, 3],
                                                                          "data_offsets": [0.0, "24"]}), bytes(32)),
     r"tensor 'a': data_offsets \[0.0, '24'\] is not \[begin, end\]"),
    ("overlap", safetensors_bytes(_mutate(good_header(), b={"dtype": "F64", "shape": [],
                                                             "data_offsets": [16, 24]}), bytes(32)),
     r"tensors 'a' and 'b' share bytes"),
    ("bad __metadata__", safetensors_bytes(_mutate(good_header(), __metadata__={"caffe": 3}), bytes(32)),
     r"__metadata__ must map strings to strings"),
    ("metadata not JSON", safetensors_bytes(_mutate(good_header(), __metadata__={"caffe": "{"}), bytes(32)),
     r"__metadata__\['caffe'\] is not JSON"),
]


@pytest.mark.parametrize("content, message", [c[1:] for c in SAFETENSORS_CASES],
                         ids=[c[0] for c in SAFETENSORS_CASES])
def test_mutated_safetensors(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(TensorFileError, match=rf"^{tmp_path}/m\.safetensors: .*{message}"):
        read_tensor_file(path)


def test_every_cut_of_a_file_is_reported(tmp_path):
    whole = tmp_path / "whole.safetensors"
    write_tensor_file(whole, {"ip.weight": torch.randn(3, 2), "ip.bias": torch.randn(3)}, METADATA)
    data = whole.read_bytes()
    for cut in range(0, len(data) - 1, 7):
        path = write(tmp_path, data[:cut])
        with pytest.raises(TensorFileError, match=r"m\.safetensors: "):
            read_tensor_file(path)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format="other"), r"metadata format: 'other' is not 'segaware-caffe-weights'"),
    (lambda m: m.update(version=7), r"metadata version: 7 is not supported"),
    (lambda m: m.update(layers={}), r"metadata layers: expected a list"),
    (lambda m: m["layers"][0].pop("key"), r"metadata layers\[0\]\.key: expected a string"),
    (lambda m: m["layers"][0]["blobs"][0].update(dtype="int8"),
     r"metadata layers\[0\]\.blobs\[0\] \(layer 'ip'\)\.dtype: 'int8' is not one of float32, float64"),
    (lambda m: m["layers"][0]["blobs"][0].update(shape=[3, -1]),
     r"metadata layers\[0\]\.blobs\[0\] \(layer 'ip'\)\.shape: \[3, -1\] is not a list of "
     r"non-negative integers"),
    (lambda m: m["layers"][0]["blobs"][1].update(legacy={"depth": 2}), r"metadata layers\[0\]\.blobs\[1\] \(layer 'ip'\)\.legacy: \{'depth': 2\} is not an object"),
    (lambda m: m["net"].update(phase="deploy"), r"metadata net\.phase: 'deploy' is not 'train' or 'test'"),
    (lambda m: m["net"].update(variables={"A": 1}), r"metadata net\.variables: expected an object of strings"),
])
def test_metadata_structure_is_checked(change, message):
    metadata = json.loads(json.dumps(METADATA))
    change(metadata)
    with pytest.raises(TensorFileError, match=rf"^m\.pt: {message}"):
        check_metadata(metadata, "m.pt")


class Payload:
    def __reduce__(self):   # what a malicious pickle does: call a function while loading
        return (print, ("this must never run",))


def test_pickled_objects_are_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": Payload()}, path)
    with pytest.raises(TensorFileError, match=r"evil\.pt: holds Python objects other than tensors"):
        read_tensor_file(path)
    assert "this must never run" not in capsys.readouterr().out


def test_legacy_or_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    with pytest.raises(TensorFileError, match=r"old\.pt: not a torch zip file"):
        read_tensor_file(path)


def test_pt_content_must_be_tensors(tmp_path):
    for content, message in [([torch.zeros(1)], r"the file's content is a list"),
                             ({"a": 3}, r"tensor 'a' is a int, not a tensor"),
                             ({"a": torch.zeros(2, dtype=torch.complex64)}, r"tensor 'a' is torch.complex64"),
                             ({"state_dict": {"a": torch.zeros(1)}, "more": 1}, r"unexpected entries \['more'\]")]:
        path = tmp_path / "c.pt"
        torch.save(content, path)
        with pytest.raises(TensorFileError, match=rf"c\.pt: {message}"):
            read_tensor_file(path)
        path.unlink()


def test_truncated_and_inflated_pt(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"a": torch.randn(64)}, path)
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 30):
        broken = write(tmp_path, data[:cut], "cut.pt")
        with pytest.raises(TensorFileError, match=r"cut\.pt: (not a torch zip file|broken)"):
            read_tensor_file(broken)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(50_000_000))
    with pytest.raises(TensorFileError, match=r"bomb\.pt: zip entry 'archive/data/0' claims "
                                              r"50,000,000 bytes in a [\d,]+-byte file"):
        read_tensor_file(bomb)


def test_errors_are_ours_and_keep_value_error_compatibility(tmp_path):
    path = write(tmp_path, b"garbage!")
    with pytest.raises(ValueError) as info:
        cm.load_tensors(path)
    assert isinstance(info.value, SegawareError)
    with pytest.raises(TensorFileError, match=r"x\.npz: unknown tensor file type '\.npz'"):
        cm.load_tensors(tmp_path / "x.npz")


def test_convert_to_caffemodel_cli_names_the_file(golden, tmp_path, capsys):
    case = golden / "layers/innerproduct"
    good = tmp_path / "m.safetensors"
    assert main(["convert", str(case / "net.prototxt"), str(case / "weights.caffemodel"),
                 "-o", str(good)]) == 0
    data = bytearray(good.read_bytes())
    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_length], object_pairs_hook=collections.OrderedDict)
    header["ip.weight"]["shape"] = [7, 61]
    raw = json.dumps(header).encode()
    bad = write(tmp_path, struct.pack("<Q", len(raw)) + raw + bytes(data[8 + header_length:]), "bad.safetensors")
    capsys.readouterr()
    assert main(["convert", str(case / "net.prototxt"), str(bad), "--to-caffemodel",
                 "-o", str(tmp_path / "back.caffemodel")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"segaware-caffe convert: error: {bad}: tensor 'ip.weight': shape [7, 61] "
                          f"of F32 needs 1,708 bytes") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "back.caffemodel").exists()


def test_missing_tensor_names_the_file(golden, tmp_path):
    case = golden / "layers/innerproduct"
    path = tmp_path / "partial.safetensors"
    write_tensor_file(path, {"ip.weight": torch.zeros(7, 60)}, None)
    with pytest.raises(ValueError, match=rf"^{path}: the tensors have no entry for 1 blob\(s\) of "
                                         rf"the net: ip.bias"):
        cm.convert_to_caffemodel(case / "net.prototxt", path, tmp_path / "back.caffemodel")
