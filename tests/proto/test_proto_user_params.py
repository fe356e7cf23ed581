"""Other forks' layer parameters: unknown ones are errors that say how to declare them; declared
ones (register_layer(..., params=...)) reach the user's layer as plain Python values, from a
prototxt or from a binary file of that fork."""
import uuid

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.caffe_proto import CaffeFormatError, caffe_pb2, read_net, read_weights
from segaware_caffe.caffe_proto.extensions import DeclarationError, declare
from segaware_caffe.caffe_proto.wire import encode_len_field as field
from segaware_caffe.caffe_proto.wire import encode_varint as varint


def unique(prefix):
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def test_an_unknown_param_block_says_where_and_how_to_declare_it(tmp_path):
    path = tmp_path / "yolo.prototxt"
    path.write_text('name: "n"\nlayer {\n  name: "up"\n  type: "Upsample"\n  bottom: "x"\n'
                    '  upsample_param { scale: 2 }\n}\n')
    with pytest.raises(CaffeFormatError) as info:
        read_net(path)
    message = str(info.value)
    assert message.startswith(f"{path}:6:3: in layer 'up' (Upsample): ")
    assert 'no field named "upsample_param"' in message
    assert ("declare it with the layer that reads it: @segaware_caffe.register_layer('Upsample', "
            "params='optional MyParameter upsample_param = <its field number>;") in message


def test_an_unknown_field_inside_a_known_param_says_it_cannot_be_declared():
    with pytest.raises(CaffeFormatError, match=r"<text>:1:59: in layer 'c' \(Convolution\): "
                       r"(.|\n)*ConvolutionParameter of segaware-caffe's schema \(segaware fork, "
                       r"BVLC and SSD fields\) has no deformable_group"):
        read_net('layer { name: "c" type: "Convolution" convolution_param { deformable_group: 4 } }')


def _upsample_layer(type_name, param, number):
    spec = f"""
        optional {param.title().replace('_', '')} {param} = {number};
        repeated int32 {param}_extra = {number + 1};
        message {param.title().replace('_', '')} {{
          optional int32 scale = 1 [default = 2];
          enum Mode {{ NEAREST = 0; BILINEAR = 1; }}
          optional Mode mode = 2 [default = NEAREST];
          repeated float weights = 3;
          optional string tag = 4 [default = "up"];
          optional FillerParameter filler = 5;
          optional Inner inner = 6;
          message Inner {{ optional bool flag = 1; optional double gain = 2 [default = 0.5]; }}
        }}"""

    @sc.register_layer(type_name, params=spec)
    class Upsample(sc.CaffeLayer):
        def __init__(self, *, scale, values, given):
            super().__init__()
            self.scale, self.values, self.given = scale, values, given

        @classmethod
        def from_proto(cls, layer_param, ctx):
            values, given = cls.user_params(layer_param, given=True)
            if values[param]["scale"] < 1:
                raise ctx.error(f"{param}.scale must be >= 1, got {values[param]['scale']}")
            return cls(scale=values[param]["scale"], values=values, given=given)

        def forward(self, x):
            return x.repeat_interleave(self.scale, 2).repeat_interleave(self.scale, 3)
    return Upsample


def test_declared_params_reach_the_layer_as_plain_values():
    type_name, param = unique("Upsample"), unique("upsample_param_")
    _upsample_layer(type_name, param, 3100)
    text = (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 1 dim: 1 dim: 2 dim: 2 }} }} }}\n'
            f'layer {{\n  name: "up" type: "{type_name}" bottom: "x" top: "y"\n'
            f'  {param} {{ scale: 3 mode: BILINEAR weights: [0.25, 0.75] filler {{ type: "xavier" }}\n'
            f'    inner {{ flag: true }} }}\n  {param}_extra: 7 {param}_extra: 8\n}}\n'
            f'layer {{ name: "up2" type: "{type_name}" bottom: "y" top: "z" }}\n')
    net = sc.Net(text)
    up, up2 = net.layers["up"], net.layers["up2"]
    assert up.values == {param: {"scale": 3, "mode": "BILINEAR", "weights": [0.25, 0.75], "tag": "up",
                                 "filler": {"type": "xavier", "value": 0.0, "min": 0.0, "max": 1.0,
                                            "mean": 0.0, "std": 1.0, "sparse": -1,
                                            "variance_norm": "FAN_IN"},
                                 "inner": {"flag": True, "gain": 0.5}},
                         f"{param}_extra": [7, 8]}
    assert up.given == {param, f"{param}.scale", f"{param}.mode", f"{param}.weights",
                        f"{param}.filler", f"{param}.filler.type", f"{param}.inner",
                        f"{param}.inner.flag", f"{param}_extra"}
    assert up2.values[param]["scale"] == 2 and up2.values[f"{param}_extra"] == [] and not up2.given
    assert net.forward(x=torch.ones(1, 1, 2, 2))["z"].shape == (1, 1, 12, 12)
    # the layer's own validation of the values, at build time
    with pytest.raises(sc.LayerSetupError, match=rf"up \({type_name}\): {param}.scale must be >= 1"):
        sc.Net(text.split("\n")[0] + f'\nlayer {{ name: "up" type: "{type_name}" bottom: "x" '
               f'top: "y" {param} {{ scale: 0 }} }}')


def test_errors_inside_a_declared_block_keep_the_files_positions():
    type_name, param = unique("Upsample"), unique("upsample_param_")
    _upsample_layer(type_name, param, 3200)
    text = f'name: "n"\nlayer {{ name: "up" type: "{type_name}"\n   {param} {{ scael: 2 }} }}\n'
    column = 4 + len(param) + 3
    with pytest.raises(CaffeFormatError, match=rf"<text>:3:{column}: in layer 'up' \({type_name}\): "
                       rf".*no field named \"scael\"(.|\n)*did you mean scale\?"):
        read_net(text)


def test_declared_params_in_binary_files_of_that_fork(tmp_path):
    type_name, param = unique("Upsample"), unique("upsample_param_")
    _upsample_layer(type_name, param, 3300)
    # the other fork's caffemodel: LayerParameter field 3300 holds its UpsampleParameter
    upsample = varint(1 << 3) + varint(4) + field(4, b"tagged")          # scale 4, tag "tagged"
    weight = caffe_pb2.BlobProto()
    weight.shape.dim.append(2)
    weight.data.extend([1.0, 2.0])
    layer = (field(1, b"up") + field(2, type_name.encode()) + field(3300, upsample)
             + varint(3301 << 3) + varint(9) + field(7, weight.SerializeToString()))
    net_param = read_weights(field(100, layer))
    values = sc.layer.layer_class(type_name).user_params(net_param.layer[0])
    assert values[param]["scale"] == 4 and values[param]["tag"] == "tagged"
    assert values[f"{param}_extra"] == [9]
    # a net built from the prototxt writes the declared fields back into its caffemodel
    net = sc.Net(f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 1 dim: 1 dim: 1 dim: 1 }} }} }}\n'
                 f'layer {{ name: "up" type: "{type_name}" bottom: "x" top: "y" {param} {{ scale: 5 }} }}')
    net.save_weights(tmp_path / "w.caffemodel")
    again = read_weights(tmp_path / "w.caffemodel")
    assert sc.layer.layer_class(type_name).user_params(again.layer[1])[param]["scale"] == 5


@pytest.mark.parametrize("spec, pattern", [
    ("optional int32 convolution_param = 3500;", r"LayerParameter already has a field named "
                                                 r"'convolution_param' \(number 106\)"),
    ("optional int32 my_weird = 106;", r"number 106 is LayerParameter.convolution_param in "
                                       r"segaware-caffe's schema; choose a free number"),
    ("optional Missing my_missing = 3501;", r"params line 1: unknown type 'Missing'"),
    ("message OnlyMessage { optional int32 a = 1; }", r"declares no LayerParameter field"),
    ("optional int32 my_bad = 3502 [deprecated = true];", r"option deprecated is not supported"),
    ("optional int32 my_x = abc;", r"number must be a positive integer"),
    ("syntax = 'proto2';", r"'syntax' is not needed here"),
    ("optional int32 my_y = 3503", r"unexpected end, expected ';'"),
])
def test_bad_declarations(spec, pattern):
    with pytest.raises(DeclarationError, match=pattern):
        declare(spec)


def test_declarations_are_idempotent_and_conflicts_are_errors():
    name = unique("my_field_")
    assert declare(f"optional int32 {name} = 3600;") == [name]
    assert declare(f"optional   int32 {name} = 3600 ;") == [name]     # the same text again
    with pytest.raises(DeclarationError, match=rf"field '{name}' is already declared"):
        declare(f"optional float {name} = 3601;")
    with pytest.raises(TypeError, match=r"params must be proto2 text"):
        declare({"scale": int})
