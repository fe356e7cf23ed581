"""kernels/geometry.py: the one convolution geometry (kernels, params, the Convolution layers),
Caffe's output-size rules against torch's convolutions, the op-list form, and the one input
check with its messages."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from segaware_caffe import params
from segaware_caffe.kernels.geometry import ConvGeometry, check_tensor, tap_inside, tap_offsets
from tests.kernels.layer_helpers import build_layer


def test_one_class_everywhere():
    assert params.ConvGeometry is ConvGeometry
    layer = build_layer('name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param '
                        '{ num_output: 2 kernel_h: 3 kernel_w: 2 pad: 1 stride: 2 dilation: 2 }',
                        [(1, 3, 9, 8)])
    assert layer.geometry == ConvGeometry((3, 2), (1, 1), (2, 2), (2, 2))


@pytest.mark.parametrize("kernel, pad, stride, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 2), (0, 2), (2, 1), (1, 3)), ((5, 1), (4, 0), (3, 2), (2, 1)),
    ((1, 1), (0, 0), (1, 1), (1, 1)), ((3, 3), (12, 12), (1, 1), (12, 12))])
@pytest.mark.parametrize("size", [(7, 9), (26, 25)])
def test_output_sizes_agree_with_torch(kernel, pad, stride, dilation, size):
    geometry = ConvGeometry.of(kernel, pad, stride, dilation)
    x = torch.zeros(1, 1, *size)
    weight = torch.zeros(1, 1, *kernel)
    out = geometry.output_size(*size)
    if min(out) > 0:
        assert F.conv2d(x, weight, None, stride, pad, dilation).shape[2:] == out
    deconv = geometry.deconv_output_size(*size)
    if min(deconv) > 0:
        assert F.conv_transpose2d(x, weight, None, stride, pad, 0, 1, dilation).shape[2:] == deconv


def test_list_form_round_trips_and_taps():
    geometry = ConvGeometry.of((3, 2), (1, 0), (2, 1), (1, 2))
    assert geometry.as_list() == [3, 2, 1, 0, 2, 1, 1, 2]
    assert ConvGeometry.from_list(geometry.as_list()) == geometry
    assert geometry.taps == 6 and geometry.centre_tap == (1, 1)
    assert geometry.centre_offset == (1, 2)
    assert tap_offsets(geometry)[3] == (1, 1, 1, 2)
    with pytest.raises(ValueError, match="holds 8 ints"):
        ConvGeometry.from_list([3, 3])


def test_tap_inside_is_the_definition():
    geometry = ConvGeometry.of(3, (2, 1), (2, 1), (1, 2))
    inside = tap_inside(geometry, 5, 6, "cpu")
    out_h, out_w = geometry.output_size(5, 6)
    for i, j, ho, wo in itertools.product(range(3), range(3), range(out_h), range(out_w)):
        h, w = ho * 2 - 2 + i, wo - 1 + j * 2
        assert bool(inside[i, j, ho, wo]) == (0 <= h < 5 and 0 <= w < 6)


@pytest.mark.parametrize("args, message", [
    (dict(kernel_size=0), r"kernel_size must be > 0, got \(0, 0\)"),
    (dict(kernel_size=3, pad=-1), r"pad must be >= 0"),
    (dict(kernel_size=3, stride=(1, 0)), r"stride must be > 0, got \(1, 0\)"),
    (dict(kernel_size=3, dilation=0), r"dilation must be > 0"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size must be an int or a pair \(h, w\)"),
    (dict(kernel_size=True), r"kernel_size must be an int or a pair"),
])
def test_validation_messages(args, message):
    with pytest.raises(ValueError, match=message):
        ConvGeometry.of(**args)


def test_dilation_zero_is_allowed_unvalidated():
    # NormConvMeanfield's default: every tap reads the centre
    geometry = ConvGeometry((3, 3), (0, 0), (1, 1), (0, 0))
    assert geometry.output_size(5, 5) == (5, 5)


def test_check_output_size_names_the_op():
    with pytest.raises(ValueError, match=r"im2dist: input 4x4 is too small for kernel \(7, 7\)"):
        ConvGeometry.of(7).check_output_size(4, 4, "im2dist")


@pytest.mark.parametrize("tensor, kwargs, error, message", [
    ([1, 2], dict(), TypeError, "op: t must be a tensor, got list"),
    (torch.zeros(2, 3), dict(dim=4), ValueError, r"op: t must be 4-D \(N, C, H, W\), got shape \(2, 3\)"),
    (torch.zeros(2, dtype=torch.int8), dict(), TypeError,
     "op: t must be one of float16, bfloat16, float32, float64, got torch.int8"),
    (torch.zeros(2), dict(like=torch.zeros(2, device="meta")), ValueError,
     "op: t must be on meta like the first input, got cpu"),
    (torch.zeros(2), dict(like=torch.zeros(2, dtype=torch.float64), same_dtype=True), ValueError,
     "op: t must be torch.float64 like the first input, got torch.float32"),
    (torch.zeros(2, 3), dict(shape=(2, 4)), ValueError, r"op: t must have shape \(2, 4\), got \(2, 3\)"),
    (torch.zeros(3), dict(shape=(2,)), ValueError, r"op: t must have shape \(2,\), got \(3,\)"),
    (torch.zeros(2, 3), dict(shape=(None, 4)), ValueError, r"must have shape \(\*, 4\)"),
])
def test_check_tensor_messages(tensor, kwargs, error, message):
    with pytest.raises(error, match=message):
        check_tensor("op", "t", tensor, **kwargs)
    assert check_tensor("op", "t", torch.zeros(2, 4), shape=(None, 4)) is not None
