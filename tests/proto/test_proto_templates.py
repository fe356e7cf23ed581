"""`${VAR}` templates, KEY=value variable files, and BVLC caffemodels whose layer fields clash
with the fork's numbers."""
import warnings

import numpy as np
import pytest

from segaware_caffe.caffe_proto import (caffe_pb2, read_net, read_variables, read_weights,
                         weights_to_arrays)
from segaware_caffe.caffe_proto.wire import encode_len_field


def test_dict_variables_substitute_everywhere_but_unset_ones_in_comments_stay():
    text = ('name: "${NET_ID}"  # trained with ${UNSET_IN_COMMENT}\n'
            'layer { name: "c" type: "Convolution" param { lr_mult: ${LR} }\n'
            '  convolution_param { num_output: ${N} kernel_size: ${K} bias_term: ${BIAS} } }\n')
    net = read_net(text, {"NET_ID": "x#1", "LR": 2.5, "N": 16, "K": 3, "BIAS": False})
    assert net.name == "x#1"  # a `#` inside a string is not a comment
    assert net.layer[0].param[0].lr_mult == 2.5
    conv = net.layer[0].convolution_param
    assert (conv.num_output, list(conv.kernel_size), conv.bias_term) == (16, [3], False)


def test_shell_variable_file(tmp_path):
    path = tmp_path / "vars.sh"
    path.write_text(
        "#!/bin/bash\n"
        "# settings of the run\n"
        "export EXP=segaware\n"
        "NET_ID='res'   # single quotes\n"
        'DATA_ROOT="/data/VOC 2012"\n'
        "\n"
        "CROP_SIZE=321 # trailing comment\n"
        "LIST=${EXP}/list/$NET_ID.txt\n"
        "LITERAL='$EXP'\n"
        "EMPTY=\n")
    variables = read_variables(path)
    assert variables == {"EXP": "segaware", "NET_ID": "res", "DATA_ROOT": "/data/VOC 2012",
                         "CROP_SIZE": "321", "LIST": "segaware/list/res.txt", "LITERAL": "$EXP",
                         "EMPTY": ""}
    net = read_net('name: "${NET_ID}" layer { name: "d" type: "ImageSegData" '
                   'image_data_param { root_folder: "${DATA_ROOT}" source: "${LIST}" } '
                   'transform_param { crop_size: ${CROP_SIZE} } }', variables=str(path))
    assert net.layer[0].image_data_param.root_folder == "/data/VOC 2012"
    assert net.layer[0].transform_param.crop_size == 321


def test_released_template_with_variable_file(reference, tmp_path):
    path = tmp_path / "vars.sh"
    path.write_text("NET_ID=res\nEXP=segaware\nTEST_SET=val\nFEATURE_DIR=features\n"
                    "DATA_ROOT=/voc\nBATCH_SIZE=1\nCROP_SIZE=513\nDATASET=voc12\nNUM_LABELS=21\n"
                    "MAIN_LR1=1\nMAINSCALE_LR1=1\nMAINSCALE_LR2=2\nFINAL_LR1=10\nFINAL_LR2=20\n"
                    "CRF_LR1=1\nCRF_LR2=1\nEMBS_LR1=1\nEMBS_LR2=2\nEMBS_LR3=0\n"
                    "MASK_SIZE=3\nMASK_PAD=1\nMASK_DILATION=1\nMASK2_SIZE=3\nMASK2_PAD=2\n"
                    "MASK2_DILATION=2\nMASK3_SIZE=3\nMASK3_PAD=5\nMASK3_DILATION=5\nHALF_SIZE=257\n")
    net = read_net(reference / "segaware" / "config" / "res" / "test.prototxt",
                   variables=path)
    assert net.name == "res" and len(net.layer) > 100


def _bvlc_layer(name, layer_type, number, sub_message, blobs=()):
    layer = caffe_pb2.LayerParameter(name=name, type=layer_type)
    layer.blobs.extend(blobs)
    return layer.SerializeToString() + encode_len_field(number, sub_message.SerializeToString())


def test_bvlc_caffemodel_with_clashing_field_numbers_decodes_correctly():
    weight = caffe_pb2.BlobProto()
    weight.shape.dim.extend([2, 3])
    weight.data.extend(np.arange(6, dtype=np.float32).tolist())
    input_param = caffe_pb2.InputParameter()
    input_param.shape.add().dim.extend([1, 3, 8, 8])
    crop_param = caffe_pb2.CropParameter(axis=2, offset=[4, 5])
    interp_param = caffe_pb2.InterpParameter(zoom_factor=2)
    layers = [
        _bvlc_layer("data", "Input", 143, input_param),
        _bvlc_layer("crop", "Crop", 144, crop_param),
        _bvlc_layer("up", "Interp", 143, interp_param),        # a fork file: kept as is
        _bvlc_layer("clip", "Clip", 148, caffe_pb2.ClipParameter(min=-1, max=1)),
        _bvlc_layer("ip", "InnerProduct", 143, input_param, blobs=[weight]),  # fits neither
    ]
    data = caffe_pb2.NetParameter(name="bvlc").SerializeToString() + b"".join(
        encode_len_field(100, layer) for layer in layers)
    with pytest.warns(UserWarning, match=r"layer 'ip' \(InnerProduct\): field number 143 is "
                      r"interp_param in the segaware fork and input_param in BVLC Caffe"):
        net = read_weights(data)
    data_layer, crop, up, clip, ip = net.layer
    assert [layer.name for layer in net.layer] == ["data", "crop", "up", "clip", "ip"]
    assert data_layer.input_param == input_param and not data_layer.HasField("interp_param")
    assert crop.crop_param == crop_param and not crop.HasField("seg_accuracy_param")
    assert up.interp_param.zoom_factor == 2 and not up.HasField("input_param")
    assert (clip.clip_param.min, clip.clip_param.max) == (-1, 1)
    assert not clip.HasField("adaptive_bias_channel_param")
    assert not ip.HasField("interp_param")
    assert np.array_equal(weights_to_arrays(net)["ip"][0], np.arange(6).reshape(2, 3))


def test_fork_caffemodel_fields_need_no_fixing(golden):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = read_weights(golden / "nets" / "embs_deploy" / "weights.caffemodel")
    assert net.layer[0].type == "Input" and len(net.layer[0].input_param.shape) == 1
