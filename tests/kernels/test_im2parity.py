"""kernels.im2parity and the Im2parity layer: a pure-Python reference written from the layer's
definition (a patch whose centre is outside the image gives ignore_label, 0 if unset, where both
original paths are broken), golden numbers, CUDA vs CPU, bad inputs."""
import sys

import numpy as np
import pytest
import torch

from segaware_caffe.caffe_proto import read_net
from segaware_caffe.kernels import im2parity
from segaware_caffe.kernels.im2dist import PatchGeometry
from segaware_caffe import LayerSetupError
from tests.conftest import cpu_and_cuda
from tests.kernels.cuda_emulation import emulate_cuda_launch
from tests.kernels.layer_helpers import build_layer, window_taps

GOLDEN_CASES = ["im2parity_k3p1", "im2parity_k3p1_ignore255", "im2parity_k3p1d5"]

GEOMETRIES = [
    ((1, 1, 5, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 2, 7, 5), (3, 2), (1, 0), (2, 1), (1, 1)),
    ((2, 1, 9, 8), (3, 3), (1, 1), (1, 1), (3, 2)),
    ((2, 1, 5, 5), (3, 3), (4, 3), (2, 1), (1, 2)),   # centres outside the image
]


def reference_im2parity(labels, geometry, ignore_label):
    labels = labels.double().cpu().numpy()
    out = np.zeros((labels.shape[0], geometry.taps, *geometry.output_size(*labels.shape[2:])))
    for n, k, ho, wo, (ch, cw), (nh, nw), centre_in, tap_in, _ in window_taps(labels.shape, geometry):
        value = float(ignore_label) if ignore_label is not None else 0.0
        for c in range(labels.shape[1] if centre_in else 0):     # the last channel wins
            centre = int(labels[n, c, ch, cw])
            neighbour = int(labels[n, c, nh, nw]) if tap_in else 0
            if ignore_label is not None and ignore_label in (centre, neighbour):
                value = float(ignore_label)
            else:
                value = 1.0 if centre == neighbour else 0.0
        out[n, k, ho, wo] = value
    return out


def make_labels(shape, dtype, device, contiguous, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, shape, generator=generator).to(dtype)
    labels[..., 0, :2] = 255
    labels[..., -1, -1] = 2.7            # truncated to 2
    labels[..., 1, 1] = -0.5             # truncated to 0
    labels = labels.to(device)
    if not contiguous:
        labels = labels.transpose(2, 3).contiguous().transpose(2, 3)
    return labels


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("geometry_case", GEOMETRIES)
@pytest.mark.parametrize("ignore_label", [None, 255, 2])
def test_matches_reference(device, dtype, contiguous, geometry_case, ignore_label):
    shape, kernel, pad, stride, dilation = geometry_case
    labels = make_labels(shape, dtype, device, contiguous)
    out = im2parity(labels, kernel, pad, stride, dilation, ignore_label=ignore_label)
    expected = reference_im2parity(labels, PatchGeometry.of(kernel, pad, stride, dilation),
                                   ignore_label)
    assert out.dtype == dtype and out.device == labels.device
    np.testing.assert_array_equal(out.double().cpu().numpy(), expected)


def test_output_carries_no_gradient():
    labels = torch.zeros(1, 1, 4, 4, requires_grad=True)
    out = im2parity(labels, 3, pad=1)
    assert not out.requires_grad


@pytest.mark.needs_cuda
@pytest.mark.parametrize("ignore_label", [None, 255])
def test_cuda_matches_cpu(ignore_label):
    labels = make_labels((3, 2, 17, 14), torch.float32, "cpu", True)
    cpu = im2parity(labels, (3, 5), (4, 2), (2, 1), (1, 2), ignore_label=ignore_label)
    cuda = im2parity(labels.cuda(), (3, 5), (4, 2), (2, 1), (1, 2), ignore_label=ignore_label)
    assert torch.equal(cpu, cuda.cpu())


@pytest.mark.parametrize("geometry_case", GEOMETRIES)
@pytest.mark.parametrize("ignore_label", [None, 255])
def test_cuda_source_matches_cpu_path(monkeypatch, geometry_case, ignore_label):
    """The CuPy kernel, compiled as C++ and run on one CPU thread, against the CPU path."""
    emulate_cuda_launch(monkeypatch)
    module = sys.modules["segaware_caffe.kernels.im2parity"]
    shape, kernel, pad, stride, dilation = geometry_case
    geometry = PatchGeometry.of(kernel, pad, stride, dilation)
    labels = make_labels(shape, torch.float64, "cpu", True)
    assert torch.equal(module._im2parity_forward_cuda(labels, geometry, ignore_label),
                       module._im2parity_forward_cpu(labels, geometry, ignore_label))


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden(golden, case):
    folder = golden / "layers" / case
    data = np.load(folder / "data.npz")
    layer_param = read_net(folder / "net.prototxt").layer[0]
    labels = torch.from_numpy(data["in/label"].copy())
    out = build_layer(str(layer_param), [labels.shape])(labels)
    np.testing.assert_array_equal(out.numpy(), data["out/parity"])


def test_layer_reads_ignore_label_and_geometry():
    layer = build_layer('name: "p" type: "Im2parity" bottom: "l" top: "p" convolution_param '
                        '{ kernel_size: 3 pad: 2 dilation: 2 } '
                        'im2parity_param { ignore_label: 255 }',
                        [(1, 1, 8, 9)])
    assert layer.ignore_label == 255 and layer.dilation == (2, 2)
    assert layer.output_shapes([(1, 1, 8, 9)]) == [(1, 9, 8, 9)]
    assert "ignore_label=255" in repr(layer)
    unset = build_layer('name: "p" type: "Im2parity" bottom: "l" top: "p" convolution_param '
                        '{ kernel_size: 3 }', [(1, 1, 8, 9)])
    assert unset.ignore_label is None


@pytest.mark.parametrize("text, shape, message", [
    ('', (1, 1, 5, 5), "kernel_size is required"),
    ('convolution_param { kernel_size: 7 }', (1, 1, 5, 5), "empty output"),
    ('convolution_param { kernel_size: 3 }', (1, 5, 5), "must be 4-D"),
])
def test_layer_errors_name_the_layer(text, shape, message):
    with pytest.raises(LayerSetupError, match=rf"par \(Im2parity\): .*{message}"):
        build_layer(f'name: "par" type: "Im2parity" bottom: "l" top: "p" {text}', [shape])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(labels=torch.zeros(2, 4, 4)), ValueError, "must be 4-D"),
    (dict(labels=torch.zeros(1, 1, 4, 4, dtype=torch.int32)), TypeError, "float32 or float64"),
    (dict(ignore_label=-1), ValueError, "ignore_label must be a non-negative int"),
    (dict(ignore_label=2.5), ValueError, "ignore_label must be a non-negative int"),
    (dict(stride=(1, 0)), ValueError, "stride must be > 0"),
])
def test_functional_rejects_bad_inputs(kwargs, error, message):
    arguments = dict(labels=torch.zeros(1, 1, 4, 4), kernel_size=3, pad=1)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        im2parity(**arguments)
