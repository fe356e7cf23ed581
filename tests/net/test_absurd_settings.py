"""Settings a damaged prototxt can carry that are valid numbers but no net means: a layer that
repeats its steps 2^32 times, an empty channel or width axis, a layer type with a line break."""
import pytest

import segaware_caffe as sc
from segaware_caffe import limits
from segaware_caffe.errors import NetBuildError, SizeLimitError

CRF_INPUTS = ('input: "u" input_shape { dim: 1 dim: 4 dim: 9 dim: 10 }\n'
              'input: "q0" input_shape { dim: 1 dim: 4 dim: 9 dim: 10 }\n'
              'input: "f" input_shape { dim: 1 dim: 3 dim: 9 dim: 10 }\n'
              'input: "g" input_shape { dim: 1 dim: 1 dim: 9 dim: 10 }\n'
              'input: "dims" input_shape { dim: 1 dim: 2 dim: 1 dim: 1 }\n')


@pytest.mark.parametrize("layer, field", [
    ('type: "NospConvMeanfield" bottom: "u" bottom: "q0" bottom: "f" norm_conv_meanfield_param { '
     'num_iterations: 4294967295 kernel_size: 3 pad: 1 dilation: 1 scale: 1 }',
     "norm_conv_meanfield_param.num_iterations 4294967295"),
    ('type: "DomainTransform" bottom: "u" bottom: "g" bottom: "dims" domain_transform_param { num_iter: 2000000 }',
     "domain_transform_param.num_iter 2000000"),
    ('type: "DenseCRF" bottom: "u" bottom: "dims" dense_crf_param { max_iter: 99999 pos_w: 3 pos_xy_std: 3 }',
     "dense_crf_param.max_iter 99999"),
])
def test_layer_iterations_past_the_limit_are_refused(layer, field):
    text = CRF_INPUTS + f'layer {{ name: "crf" {layer} top: "out" }}\n'
    with pytest.raises(SizeLimitError, match=rf"^crf \(\w+\): {field} is more steps of one "
                                             rf"layer's forward than any run plausibly means"):
        sc.Net(text)
    with limits.raised(layer_iterations=2 ** 32):    # raised on request, it builds
        assert sc.Net(text).blob_shapes["out"] == (1, 4, 9, 10)


@pytest.mark.parametrize("dims, top", [("dim: 2 dim: 0 dim: 17 dim: 16", "data"),
                                       ("dim: 2 dim: 3 dim: 9 dim: 0", "data")])
def test_an_empty_axis_other_than_the_batch_is_refused(dims, top):
    text = (f'input: "data" input_shape {{ {dims} }}\n'
            'layer { name: "i" type: "Interp" bottom: "data" top: "y" interp_param { zoom_factor: 2 } }\n')
    with pytest.raises(NetBuildError, match=rf"top '{top}' would have shape \(.*\): an empty axis "
                                            rf"other than the first \(batch\) axis is not supported"):
        sc.Net(text)


def test_an_empty_batch_still_builds():
    net = sc.Net('input: "data" input_shape { dim: 0 dim: 3 dim: 4 dim: 4 }\n'
                 'layer { name: "i" type: "Interp" bottom: "data" top: "y" interp_param { zoom_factor: 2 } }\n')
    assert net.blob_shapes["y"] == (0, 3, 7, 7)


def test_an_unknown_type_with_a_line_break_is_shown_on_one_line():
    with pytest.raises(NetBuildError) as caught:
        sc.Net('input: "x" input_shape { dim: 1 }\nlayer { name: "l" type: "a\\nb" bottom: "x" top: "y" }\n')
    message = str(caught.value)
    assert message.startswith("l ('a\\nb'): unknown layer type 'a\\nb'") and "\n" not in message


AUGMENTATION = ('input: "im0" input_shape { dim: 2 dim: 3 dim: 10 dim: 10 }\n'
                'input: "im1" input_shape { dim: 2 dim: 3 dim: 10 dim: 10 }\n'
                'input: "flo" input_shape { dim: 2 dim: 2 dim: 10 dim: 10 }\n'
                'layer { name: "aug" type: "Augmentation" bottom: "im0" bottom: "im1" bottom: "flo" '
                'top: "a0" top: "a1" top: "aflo" top: "mask" aug_param { num_transformations: 1 '
                'min_translation: %s max_translation: 0.2 } }\n')


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_translation_that_is_not_a_number_is_refused(value):
    with pytest.raises(NetBuildError, match=r"aug \(Augmentation\): aug_param min_translation and "
                                            r"max_translation must be finite numbers"):
        sc.Net(AUGMENTATION % value)


@pytest.mark.parametrize("text", [
    # an empty batch of enormous images: no memory, but the xy map and torch's strides would be
    'layer { name: "d" type: "DummyData" top: "xy" dummy_data_param { shape { dim: 0 dim: 2 '
    'dim: 2000000 dim: 2000000 } data_filler { type: "xy" } } }\n',
    'input: "x" input_shape { dim: 0 dim: 3 dim: 9 dim: 10 }\n'
    'layer { name: "i" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 2000000000 } }\n',
])
def test_an_empty_batch_of_enormous_items_is_refused(text):
    from segaware_caffe.errors import MemoryBudgetError
    with pytest.raises(MemoryBudgetError, match=r"one item of it"):
        sc.Net(text, max_bytes="1G")


def test_a_pt_file_claiming_an_unknown_zip_version(tmp_path):
    """Python's zip reader raises NotImplementedError for such a directory entry: a file error."""
    import torch

    from segaware_caffe.converters.tensor_files import read_tensor_file
    from segaware_caffe.errors import TensorFileError
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(2)}, path)
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")          # the last central directory entry
    data[central + 6:central + 8] = (64).to_bytes(2, "little")     # "version needed" 6.4
    path.write_bytes(bytes(data))
    with pytest.raises(TensorFileError, match=r"w\.pt: broken zip directory \(NotImplementedError"):
        read_tensor_file(path)
