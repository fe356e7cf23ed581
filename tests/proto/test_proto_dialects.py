"""Binary files of the three Caffe dialects (segaware fork, BVLC, SSD): each reads with its own
meaning of the clashing field numbers, writes with them, and broken files say where they break."""
import re
import warnings

import numpy as np
import pytest

from segaware_caffe.caffe_proto import (CaffeFormatError, caffe_pb2, detect_dialect, read_net,
                                        read_solver, read_weights, write_weights)
from segaware_caffe.caffe_proto.dialects import DIALECTS
from segaware_caffe.caffe_proto.wire import encode_len_field as field
from segaware_caffe.caffe_proto.wire import encode_varint as varint
from segaware_caffe.caffe_proto.wire import iter_fields


def varint_field(number, value):
    return varint(number << 3) + varint(value)


def weight_blob(values):
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.append(len(values))
    blob.data.extend(values)
    return blob


def ssd_caffemodel(resize):
    """An SSD-fork caffemodel written at the wire level, as SSD's own protoc code writes it: a
    data layer whose transform_param holds SSD's resize_param (field 8), noise_param (9) and
    emit_constraint (10), and a conv layer with a weight blob."""
    transform = b"".join(varint(5 << 3 | 5) + np.float32(v).tobytes() for v in (104, 117, 123))
    transform += field(8, resize.SerializeToString())
    transform += field(9, caffe_pb2.NoiseParameter(prob=0.25, decolorize=True).SerializeToString())
    transform += field(10, caffe_pb2.EmitConstraint(emit_type=1, emit_overlap=0.5).SerializeToString())
    data_layer = (field(1, b"data") + field(2, b"AnnotatedData") + field(4, b"data")
                  + field(100, transform)
                  + field(200, caffe_pb2.AnnotatedDataParameter(label_map_file="labels.prototxt")
                          .SerializeToString()))
    conv = (field(1, b"conv1") + field(2, b"Convolution")
            + field(7, weight_blob([1.5, -2.0, 3.25]).SerializeToString()))
    return field(1, b"ssd_net") + field(100, data_layer) + field(100, conv)


RESIZES = [
    # 4 bytes of payload: under the fork's numbering it would decode silently as one float
    caffe_pb2.ResizeParameter(height=30, width=20),
    # 7 bytes: not a whole number of floats, the fork's numbering cannot decode it at all
    caffe_pb2.ResizeParameter(height=300, width=30, interp_mode=[1]),
    caffe_pb2.ResizeParameter(prob=1, resize_mode=3, height=512, width=512, pad_mode=2,
                              interp_mode=[1, 2, 3, 4, 5], pad_value=[0.5]),
]


@pytest.mark.parametrize("resize", RESIZES, ids=lambda r: f"{r.ByteSize()}bytes")
def test_ssd_caffemodel_with_resize_param_in_transform_param_reads_as_ssd(resize):
    assert resize.ByteSize() in (4, 7) or resize.ByteSize() > 12
    data = ssd_caffemodel(resize)
    assert detect_dialect(data) == "ssd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = read_weights(data)
    data_layer, conv = net.layer
    transform = data_layer.transform_param
    assert transform.resize_param == resize
    assert not len(transform.scale_factors) and not transform.HasField("crop_width")
    assert (transform.noise_param.prob, transform.noise_param.decolorize) == (0.25, True)
    assert transform.emit_constraint.emit_type == caffe_pb2.EmitConstraint.MIN_OVERLAP
    assert list(transform.mean_value) == [104, 117, 123]
    assert data_layer.annotated_data_param.label_map_file == "labels.prototxt"
    assert list(conv.blobs[0].data) == [1.5, -2.0, 3.25]


def test_fork_caffemodel_with_scale_factors_reads_as_the_fork():
    """The same field numbers as the fork writes them: repeated float 8, uint32 9 and 10."""
    transform = b"".join(varint(8 << 3 | 5) + np.float32(v).tobytes() for v in (0.5, 0.75, 1.5))
    transform += varint_field(9, 321) + varint_field(10, 257) + varint_field(3, 0)
    layer = field(1, b"data") + field(2, b"ImageSegData") + field(100, transform)
    data = field(100, layer) + field(100, field(1, b"fc") + field(7, weight_blob([1.0]).SerializeToString()))
    assert detect_dialect(data) == "segaware"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = read_weights(data)
    transform = net.layer[0].transform_param
    assert list(transform.scale_factors) == [0.5, 0.75, 1.5]
    assert (transform.crop_width, transform.crop_height) == (321, 257)
    assert not transform.HasField("resize_param") and not transform.HasField("noise_param")


def test_writing_the_ssd_dialect_uses_ssds_numbers_and_reads_back(tmp_path):
    net = caffe_pb2.NetParameter(name="n")
    data_layer = net.layer.add(name="data", type="AnnotatedData", top=["data"])
    data_layer.transform_param.resize_param.height = 300
    data_layer.transform_param.resize_param.interp_mode.extend([1, 2])
    data_layer.transform_param.emit_constraint.emit_overlap = 0.7
    data_layer.transform_param.crop_h = 5
    inputs = net.layer.add(name="in", type="Input")
    inputs.input_param.shape.add().dim.extend([1, 3, 300, 300])
    conv = net.layer.add(name="conv", type="Convolution")
    conv.blobs.add().CopyFrom(weight_blob([1.0, 2.0]))
    path = tmp_path / "ssd.caffemodel"
    write_weights(net, path, dialect="ssd")
    raw = path.read_bytes()
    layers = [f for f in iter_fields(raw) if f.number == 100]
    first = raw[layers[0].value_start:layers[0].end]
    transform = next(f for f in iter_fields(first) if f.number == 100)
    numbers = {f.number: f.wire_type for f in iter_fields(first[transform.value_start:transform.end])}
    assert numbers == {8: 2, 10: 2, 11: 0}           # SSD's resize_param, emit_constraint, crop_h
    second = raw[layers[1].value_start:layers[1].end]
    assert 143 in {f.number for f in iter_fields(second)}   # input_param under BVLC's number
    assert detect_dialect(path) == "ssd"
    assert read_weights(path) == net
    # the segaware dialect (the default) keeps our numbers
    write_weights(net, tmp_path / "ours.caffemodel")
    assert (tmp_path / "ours.caffemodel").read_bytes() == net.SerializeToString()


def test_a_field_the_dialect_has_no_number_for_is_refused(tmp_path):
    net = caffe_pb2.NetParameter()
    layer = net.layer.add(name="data", type="ImageSegData")
    layer.transform_param.scale_factors.extend([0.5, 1.0])
    with pytest.raises(CaffeFormatError, match=r"cannot write the ssd dialect: layer #0 'data' "
                       r"\(ImageSegData\): TransformationParameter.scale_factors \(field 8\)"):
        write_weights(net, tmp_path / "x.caffemodel", dialect="ssd")
    up = caffe_pb2.NetParameter()
    up.layer.add(name="up", type="Interp").interp_param.zoom_factor = 2
    with pytest.raises(CaffeFormatError, match=r"bvlc dialect: layer #0 'up' \(Interp\): "
                       r"LayerParameter.interp_param \(field 143\)"):
        write_weights(up, tmp_path / "y.caffemodel", dialect="bvlc")
    assert not (tmp_path / "x.caffemodel").exists() and not (tmp_path / "y.caffemodel").exists()
    with pytest.raises(ValueError, match=r"unknown Caffe dialect 'caffe2'; known: segaware, bvlc, ssd"):
        write_weights(up, tmp_path / "z.caffemodel", dialect="caffe2")


def test_bvlc_dialect_writes_bvlc_layer_numbers(tmp_path):
    net = caffe_pb2.NetParameter()
    clip = net.layer.add(name="clip", type="Clip")
    clip.clip_param.min, clip.clip_param.max = -1, 2
    path = tmp_path / "bvlc.caffemodel"
    write_weights(net, path, dialect="bvlc")
    raw = path.read_bytes()
    layer = next(iter_fields(raw))
    assert 148 in {f.number for f in iter_fields(raw[layer.value_start:layer.end])}
    assert read_weights(path) == net      # read back per layer type


def test_forcing_a_dialect(tmp_path):
    data = ssd_caffemodel(RESIZES[0])
    net = read_weights(data, dialect="ssd")
    assert net.layer[0].transform_param.resize_param == RESIZES[0]
    # forced to the fork's reading, the 4-byte resize_param is (wrongly) one float, as asked
    forced = read_weights(data, dialect="segaware")
    assert len(forced.layer[0].transform_param.scale_factors) == 1
    with pytest.raises(CaffeFormatError, match=r"not a valid binary \.caffemodel"):
        read_weights(ssd_caffemodel(RESIZES[1]), dialect="segaware")


# ------------------------------------------------------------------------------------------------
# where a broken file breaks

def _good_file():
    net = caffe_pb2.NetParameter(name="net")
    net.layer.add(name="conv1", type="Convolution").blobs.add().CopyFrom(weight_blob([1.0] * 50))
    net.layer.add(name="conv2", type="Convolution").blobs.add().CopyFrom(weight_blob([2.0] * 50))
    return net.SerializeToString()


def test_truncation_names_the_layer_and_the_byte_offset():
    data = _good_file()
    layers = [f for f in iter_fields(data) if f.number == 100]
    cut = data[: layers[1].value_start + 30]
    with pytest.raises(CaffeFormatError, match=rf"the file is truncated: layer #1 'conv2' "
                       rf"\(Convolution\) \(from byte {layers[1].start}\): NetParameter.layer: "
                       rf"field 100 \(length-delimited\) at byte {layers[1].start} needs "
                       rf"{layers[1].end - layers[1].value_start} bytes from byte "
                       rf"{layers[1].value_start}, but the data ends 30 bytes after it"):
        read_weights(cut)
    with pytest.raises(CaffeFormatError, match=r"truncated: layer #1 \(from byte \d+\)"):
        read_weights(data[: layers[1].value_start + 1])   # not even the layer's name survives


def test_corruption_inside_a_layer_is_not_called_truncation():
    data = bytearray(_good_file())
    layers = [f for f in iter_fields(bytes(data)) if f.number == 100]
    payload = bytes(data[layers[0].value_start:layers[0].end])
    blob = next(f for f in iter_fields(payload) if f.number == 7)
    # make the blob claim more bytes than its layer has (but fewer than the file has)
    data[layers[0].value_start + blob.start + 1] += 20
    with pytest.raises(CaffeFormatError) as info:
        read_weights(bytes(data))
    message = str(info.value)
    assert "truncated" not in message
    assert re.search(r"the file is corrupt or is not a Caffe file: layer #0 'conv1' \(Convolution\) "
                     r"\(from byte 5\): LayerParameter: field 7 .*its enclosing message ends", message)


def test_bytes_that_are_no_caffe_file_are_not_called_truncated():
    for data in (b"\x07abc", b"\xff" * 12, bytes(range(1, 40))):
        with pytest.raises(CaffeFormatError) as info:
            read_weights(data)
        assert "not a valid binary .caffemodel" in str(info.value)
        assert "truncated" not in str(info.value), data


# ------------------------------------------------------------------------------------------------
# the schema holds SSD's fields, by name, with SSD's numbers or 1000 + them

# (message, field, SSD's number, our number): the SSD fork's fields this schema relies on
SSD_FIELDS = [
    ("LayerParameter", "annotated_data_param", 200, 200),
    ("LayerParameter", "multibox_loss_param", 201, 201),
    ("LayerParameter", "permute_param", 202, 202),
    ("LayerParameter", "prior_box_param", 203, 203),
    ("LayerParameter", "detection_output_param", 204, 204),
    ("LayerParameter", "detection_evaluate_param", 205, 205),
    ("LayerParameter", "norm_param", 206, 206),
    ("LayerParameter", "video_data_param", 207, 207),
    ("TransformationParameter", "resize_param", 8, 1008),
    ("TransformationParameter", "noise_param", 9, 1009),
    ("TransformationParameter", "emit_constraint", 10, 1010),
    ("TransformationParameter", "crop_h", 11, 11),
    ("TransformationParameter", "crop_w", 12, 12),
    ("TransformationParameter", "distort_param", 13, 13),
    ("TransformationParameter", "expand_param", 14, 14),
    ("SolverParameter", "eval_type", 41, 1041),
    ("SolverParameter", "ap_version", 42, 1042),
    ("SolverParameter", "plateau_winsize", 43, 43),
    ("SolverParameter", "show_per_class_result", 44, 44),
    ("SolverState", "minimum_loss", 5, 5),
    ("SolverState", "iter_last_event", 6, 6),
    ("PriorBoxParameter", "offset", 13, 13),
    ("DetectionOutputParameter", "variance_encoded_in_target", 8, 8),
    ("DetectionOutputParameter", "keep_top_k", 7, 7),
    ("DetectionOutputParameter", "confidence_threshold", 9, 9),
    ("NonMaximumSuppressionParameter", "eta", 3, 3),
    ("NormalizeParameter", "eps", 4, 4),
]


@pytest.mark.parametrize("message, name, ssd_number, ours", SSD_FIELDS)
def test_ssd_fields_have_ssds_number_or_a_renumbering_the_dialect_maps(message, name, ssd_number, ours):
    descriptor = getattr(caffe_pb2, message).DESCRIPTOR
    assert descriptor.fields_by_name[name].number == ours
    if ours != ssd_number:
        mapped = DIALECTS["ssd"].numbering(reading=True)[descriptor.full_name]
        assert mapped[ssd_number] == ours


def test_every_ssd_field_is_present_by_name(reference):
    """Against SSD's own caffe.proto where the reference material has it."""
    from tests.proto.test_proto_schema import (_compile, _field_problems, _messages, _normalised,
                                               _need_protoc)
    from google.protobuf import descriptor_pb2
    path = reference / "ssd_caffe.proto"
    if not path.is_file():
        print(f"skipping: {path} (the SSD fork's src/caffe/proto/caffe.proto) is not in the "
              f"reference material; SSD_FIELDS above checks the fields we rely on")
        pytest.skip(f"{path} is absent")
    _need_protoc()
    ssd = _normalised(_compile(path, "ssdcaffe"), "ssdcaffe")
    ours = _messages(_normalised(
        descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb), "caffe"))
    reading = DIALECTS["ssd"].numbering(reading=True)

    def compare(name, f, mine):
        if (f.type, f.type_name) != (mine.type, mine.type_name):
            return [f"{name}.{f.name}: type differs"]
        if f.number != mine.number and \
                reading.get(f"caffe.{name}", {}).get(f.number) != mine.number and \
                not (name == "LayerParameter" and mine.number == 1000 + f.number):
            return [f"{name}.{f.name}: number {mine.number}, SSD {f.number}"]
        return []
    problems = _field_problems(_messages(ssd), ours, compare)
    assert not problems, "\n".join(problems)


SSD_DEPLOY_TEXT = """
name: "ssd_text"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "norm" type: "Normalize" bottom: "data" top: "norm"
  norm_param { across_spatial: false scale_filler { type: "constant" value: 20 } channel_shared: false } }
layer { name: "perm" type: "Permute" bottom: "norm" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "prior" type: "PriorBox" bottom: "norm" bottom: "data" top: "prior"
  prior_box_param { min_size: 30 max_size: 60 aspect_ratio: 2 flip: true clip: false
                    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5 } }
layer { name: "det" type: "DetectionOutput" bottom: "a" bottom: "b" bottom: "prior" top: "det"
  include { phase: TEST }
  detection_output_param { num_classes: 2 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE keep_top_k: 200
    confidence_threshold: 0.01
    save_output_param { output_directory: "out" output_format: "VOC" resize_param { height: 300 } } } }
layer { name: "train" type: "AnnotatedData" top: "data"
  transform_param { mirror: true mean_value: 104 resize_param { prob: 1 resize_mode: WARP height: 300
    interp_mode: LINEAR interp_mode: AREA } emit_constraint { emit_type: CENTER }
    distort_param { brightness_prob: 0.5 } expand_param { prob: 0.5 max_expand_ratio: 4 } }
  annotated_data_param { batch_sampler { sampler { min_scale: 0.3 } max_trials: 50 } label_map_file: "l" } }
layer { name: "loss" type: "MultiBoxLoss" bottom: "a" multibox_loss_param { loc_loss_type: SMOOTH_L1
  match_type: PER_PREDICTION mining_type: MAX_NEGATIVE code_type: CENTER_SIZE } }
"""


def test_ssd_prototxt_text_parses_by_name():
    net = read_net(SSD_DEPLOY_TEXT)
    layers = {layer.name: layer for layer in net.layer}
    assert layers["norm"].norm_param.scale_filler.value == 20
    assert list(layers["perm"].permute_param.order) == [0, 2, 3, 1]
    assert list(layers["prior"].prior_box_param.variance) == pytest.approx([0.1, 0.1, 0.2, 0.2])
    det = layers["det"].detection_output_param
    assert det.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE and det.nms_param.top_k == 400
    assert layers["train"].transform_param.resize_param.interp_mode == [1, 2]
    assert layers["train"].annotated_data_param.batch_sampler[0].max_trials == 50


def test_ssd_solver_fields_parse():
    solver = read_solver('net: "a.prototxt"\nbase_lr: 0.001\neval_type: "detection"\n'
                         'ap_version: "11point"\nshow_per_class_result: true\n'
                         'lr_policy: "plateau"\nplateau_winsize: 1000\nplateau_winsize: 2000\n')
    assert (solver.eval_type, solver.ap_version) == ("detection", "11point")
    assert list(solver.plateau_winsize) == [1000, 2000]
