"""caffe.proto vs caffe_pb2.py (no drift) and vs the fork's and BVLC's schemas (nothing missing)."""
import re
import struct
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from segaware_caffe.caffe_proto import caffe_pb2
from segaware_caffe.tools import gen_caffe_pb2

REPO = Path(__file__).resolve().parents[2]


def _need_protoc():
    try:
        gen_caffe_pb2.protoc_main()
    except RuntimeError as e:
        print(f"skipping: {e}")
        pytest.skip(str(e))


def _compile(proto_path, package=None):
    """FileDescriptorProto of a .proto compiled by protoc (package renamed if asked)."""
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(proto_path).read_text()
        if package:
            text = re.sub(r"^package\s+caffe\s*;", f"package {package};", text, flags=re.M)
        source = Path(tmp) / "schema.proto"
        source.write_text(text)
        out = Path(tmp) / "schema.pb"
        gen_caffe_pb2.run_protoc([f"-I{tmp}", f"--descriptor_set_out={out}", str(source)])
        file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return file_set.file[0]


def _normalised(file_proto, package):
    """Descriptor with what protoc/upb print differently removed: json names, float spellings."""
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(file_proto.SerializeToString())
    file_proto.ClearField("source_code_info")

    def walk(messages):
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
                if field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE) and field.default_value:
                    field.default_value = repr(_float32(field.default_value))
                if field.type_name:
                    field.type_name = field.type_name.replace(f".{package}.", ".caffe.")
            walk(message.nested_type)
    walk(file_proto.message_type)
    file_proto.package = "caffe"
    file_proto.name = "caffe.proto"
    return file_proto


def _float32(text):
    return struct.unpack("f", struct.pack("f", float(text)))[0]


def _messages(file_proto):
    out = {}

    def walk(messages, prefix):
        for message in messages:
            out[prefix + message.name] = message
            walk(message.nested_type, prefix + message.name + ".")
    walk(file_proto.message_type, "")
    return out


def _enums(file_proto):
    out = {e.name: e for e in file_proto.enum_type}
    for name, message in _messages(file_proto).items():
        for enum in message.enum_type:
            out[f"{name}.{enum.name}"] = enum
    return out


@pytest.fixture(scope="module")
def ours():
    return _normalised(
        descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb), "caffe")


def test_caffe_pb2_matches_caffe_proto(ours):
    """Fails when caffe.proto was edited without `python tools/gen_caffe_pb2.py`."""
    _need_protoc()
    fresh = _normalised(_compile(REPO / "caffe_proto" / "caffe.proto"), "caffe")
    assert fresh == ours, "caffe_pb2.py is out of date: run python tools/gen_caffe_pb2.py"
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(gen_caffe_pb2.generate(tmp)).read_bytes()
    assert generated == (REPO / "caffe_proto" / "caffe_pb2.py").read_bytes(), \
        "caffe_pb2.py differs from protoc's output: run python tools/gen_caffe_pb2.py"


def _field_problems(theirs, ours, compare):
    """Over every field of every message of `theirs` (name -> DescriptorProto): "message M
    missing", "M.f missing", or what compare(message name, their field, our field) lists."""
    problems = []
    for name, message in theirs.items():
        if name not in ours:
            problems.append(f"message {name} missing")
            continue
        mine = {f.name: f for f in ours[name].field}
        for field in message.field:
            if field.name not in mine:
                problems.append(f"{name}.{field.name} missing")
            else:
                problems.extend(compare(name, field, mine[field.name]))
    return problems


def test_every_fork_message_field_and_enum_is_ours_unchanged(reference, ours):
    _need_protoc()
    fork = _normalised(_compile(reference / "caffe.proto", "forkcaffe"), "forkcaffe")
    our_enums = _enums(ours)

    def compare(name, field, mine):
        problems = [f"{name}.{field.name}: {attr} {getattr(field, attr)!r} in the fork, "
                    f"{getattr(mine, attr)!r} here"
                    for attr in ("number", "type", "label", "default_value", "type_name")
                    if getattr(field, attr) != getattr(mine, attr)]
        if field.options.packed != mine.options.packed:
            problems.append(f"{name}.{field.name}: packed differs")
        return problems
    problems = _field_problems(_messages(fork), _messages(ours), compare)
    for name, enum in _enums(fork).items():
        if name not in our_enums:
            problems.append(f"enum {name} missing")
            continue
        theirs = {v.name: v.number for v in enum.value}
        mine = {v.name: v.number for v in our_enums[name].value}
        if theirs != mine:
            problems.append(f"enum {name}: {theirs} in the fork, {mine} here")
    assert not problems, "\n".join(problems)


def test_every_bvlc_field_is_present_by_name_with_the_same_type(reference, ours):
    _need_protoc()
    bvlc = _normalised(_compile(reference / "bvlc_caffe.proto", "bvlccaffe"), "bvlccaffe")
    our_enums = _enums(ours)

    def compare(name, field, mine):
        if (field.type, field.type_name) != (mine.type, mine.type_name):
            return [f"{name}.{field.name}: type differs"]
        if field.number != mine.number and mine.number != 1000 + field.number:
            return [f"{name}.{field.name}: number {mine.number}, "
                    f"expected {field.number} or {1000 + field.number}"]
        return []
    problems = _field_problems(_messages(bvlc), _messages(ours), compare)
    for name, enum in _enums(bvlc).items():
        mine = {v.name: v.number for v in our_enums.get(name, descriptor_pb2.EnumDescriptorProto()).value}
        for value in enum.value:
            if mine.get(value.name) != value.number:
                problems.append(f"enum {name}.{value.name} missing or renumbered")
    assert not problems, "\n".join(problems)


def test_clashing_bvlc_layer_fields_are_renumbered_as_documented():
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for name, number in [("input_param", 1143), ("crop_param", 1144), ("parameter_param", 1145),
                         ("recurrent_param", 1146), ("swish_param", 1147), ("clip_param", 1148),
                         ("two_image_data_param", 1200), ("interp_param", 143),
                         ("seg_accuracy_param", 144)]:
        assert fields[name].number == number


def test_gen_script_says_how_to_get_protoc(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "grpc_tools", None)  # import grpc_tools now fails
    with pytest.raises(RuntimeError, match=r"grpcio-tools is not installed.*pip install grpcio-tools"):
        gen_caffe_pb2.protoc_main()
    assert gen_caffe_pb2.main(["--check"]) == 2
    assert "gen_caffe_pb2: error: grpcio-tools is not installed" in capsys.readouterr().err
