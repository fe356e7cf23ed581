"""Set-up errors name the layer and say what was expected; unsupported variants fail while
the net is built."""

import pytest

from segaware_caffe import LayerSetupError
from segaware_caffe.errors import SegawareError, UnsupportedError

from tests.layers.helpers import build


@pytest.mark.parametrize("layer_text, shapes, message", [
    ('name: "c1" type: "Convolution" bottom: "x" top: "y" convolution_param { kernel_size: 3 }',
     [(1, 2, 5, 5)], r"c1 \(Convolution\): convolution_param.num_output is required"),
    ('name: "c2" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
     'kernel_size: 3 group: 3 }', [(1, 4, 5, 5)], r"c2 \(Convolution\): .*group 3 does not divide the 4"),
    ('name: "c3" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 }',
     [(1, 4, 5, 5)], r"c3 \(Convolution\): convolution_param.kernel_size is required"),
    ('name: "c4" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
     'kernel_size: 3 bottom_is_im2col: true }', [(1, 10, 5, 5)], r"c4 \(Convolution\): .*not a multiple"),
    ('name: "c5" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
     'kernel_size: 7 }', [(1, 4, 5, 5)], r"c5 \(Convolution\): .*empty output"),
    ('name: "c6" type: "Convolution" bottom: "a" bottom: "b" top: "y" convolution_param { '
     'num_output: 4 kernel_size: 1 }', [(1, 4, 5, 5), (1, 4, 5, 5)], r"c6 \(Convolution\): needs one top per bottom"),
    ('name: "ip" type: "InnerProduct" bottom: "x" top: "y"', [(1, 4)],
     r"ip \(InnerProduct\): inner_product_param.num_output is required"),
    ('name: "p1" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX }', [(1, 1, 4, 4)],
     r"p1 \(Pooling\): pooling_param.kernel_size"),
    ('name: "p2" type: "Pooling" bottom: "x" top: "y" pooling_param { kernel_size: 2 pad: 2 }',
     [(1, 1, 4, 4)], r"p2 \(Pooling\): .*pad \(2, 2\) must be smaller than the kernel"),
    ('name: "p3" type: "Pooling" bottom: "x" top: "y" pooling_param { global_pooling: true '
     'kernel_size: 2 }', [(1, 1, 4, 4)], r"p3 \(Pooling\): with global_pooling"),
    ('name: "p4" type: "Pooling" bottom: "x" top: "y" top: "m" pooling_param { pool: AVE '
     'kernel_size: 2 }', [(1, 1, 4, 4)], r"p4 \(Pooling\): AVE pooling has one top"),
    ('name: "i1" type: "Interp" bottom: "x" top: "y" interp_param { height: 4 }', [(1, 1, 4, 4)],
     r"i1 \(Interp\): interp_param needs an output size rule"),
    ('name: "i2" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 2 pad_beg: 1 }',
     [(1, 1, 4, 4)], r"i2 \(Interp\): interp_param.pad_beg and pad_end must be <= 0"),
    ('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 4 }', [(1, 1, 4, 4)],
     r"l \(LRN\): lrn_param.local_size must be odd, got 4"),
    ('name: "s1" type: "Scale" bottom: "x" bottom: "g" top: "y"', [(2, 3, 4), (4,)],
     r"s1 \(Scale\): the scale bottom's shape \(4,\) must match"),
    ('name: "s2" type: "Scale" bottom: "x" top: "y" scale_param { axis: 2 num_axes: 2 }',
     [(2, 3, 4)], r"s2 \(Scale\): scale_param: axis 2 \+ num_axes 2 runs past"),
    ('name: "s3" type: "Scale" bottom: "x" top: "y" scale_param { axis: 3 }', [(2, 3, 4)],
     r"s3 \(Scale\): scale_param.axis 3 is out of range"),
    ('name: "d1" type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 1 } '
     'data_filler {} data_filler {} data_filler {} }', [], r"d1 \(DummyData\): .*data_filler"),
    ('name: "d2" type: "DummyData" top: "a" dummy_data_param { shape { dim: 1 dim: 3 } '
     'data_filler { type: "xy" } }', [], r"d2 \(DummyData\): the xy filler needs"),
    ('name: "d3" type: "DummyData" top: "a" dummy_data_param { num: 1 num: 2 channels: 1 '
     'height: 1 width: 1 }', [], r"d3 \(DummyData\): dummy_data_param.num needs 1 or 1"),
])
def test_errors(layer_text, shapes, message):
    with pytest.raises(LayerSetupError, match=message):
        build(layer_text, shapes)


def test_unsupported_features_fail_at_build():
    with pytest.raises(LayerSetupError, match=r"p \(Pooling\): .*padding is implemented only "
                                              r"for MAX and AVE"):
        build('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: STOCHASTIC '
              'kernel_size: 2 pad: 1 }', [(1, 1, 4, 4)])
    with pytest.raises(UnsupportedError, match=r"d \(Deconvolution\): .*bottom_is_im2col"):
        build('name: "d" type: "Deconvolution" bottom: "x" top: "y" convolution_param { '
              'num_output: 2 kernel_size: 2 bottom_is_im2col: true }', [(1, 4, 4, 4)])
    with pytest.raises(UnsupportedError, match=r"c \(Convolution\): only 2-D"):
        build('name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { '
              'num_output: 2 kernel_size: 2 }', [(1, 4, 4, 4, 4)])


@pytest.mark.parametrize("layer_text, shape, message", [
    ('type: "Im2col" convolution_param { kernel_size: 2 }', (1, 2, 4, 4, 4),
     r"only 4-D \(N, C, H, W\) bottoms are supported, got shape \(1, 2, 4, 4, 4\)"),
    ('type: "Im2col" convolution_param { kernel_size: 2 axis: 0 }', (1, 2, 4, 4),
     r"only convolution_param.axis 1 is supported, got 0"),
    ('type: "Im2dist" convolution_param { kernel_size: 3 axis: 0 }', (1, 2, 4, 4),
     r"only convolution_param.axis 1 is supported, got 0"),
])
def test_unsupported_variants_are_unsupported_errors_naming_the_layer(layer_text, shape, message):
    with pytest.raises(UnsupportedError, match=r"^u \(Im2(col|dist)\): " + message) as info:
        build(f'name: "u" {layer_text} bottom: "x" top: "y"', [shape])
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, SegawareError)
