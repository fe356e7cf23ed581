"""kernels.dist_loss and the DistLoss layer: reference from the layer's definition, with the
project's repair of the original (both of whose paths are broken there): every image, ignored
elements give nothing, divide by the full count, gradient m/count ignoring loss_weight; the golden distloss_* cases (Im2dist -> DistLoss chain), CUDA vs CPU, bad inputs."""
import sys

import numpy as np
import pytest
import torch

from segaware_caffe.caffe_proto import read_net
from segaware_caffe.kernels import dist_loss, im2dist, im2parity
from segaware_caffe import LayerSetupError
from tests.conftest import cpu_and_cuda
from tests.kernels.cuda_emulation import emulate_cuda_launch
from tests.kernels.layer_helpers import assert_golden_close, build_layer

GOLDEN_CASES = ["distloss_k3p0_ignore255_n1", "distloss_k3p1", "distloss_k3p1d2_pad1"]


def reference_dist_loss(dist, parity, alpha, beta, ignore_label):
    """(loss, gradient of dist) element by element."""
    dist = dist.detach().double().cpu().numpy().ravel()
    parity = parity.double().cpu().numpy().ravel()
    loss, grad = 0.0, np.zeros_like(dist)
    for e, (d, p) in enumerate(zip(dist, parity)):
        p = int(p)
        if ignore_label is not None and p == ignore_label:
            continue
        if p != 0:
            m = max(d - alpha, 0.0)
            grad[e] = m
        else:
            m = max(beta - d, 0.0)
            grad[e] = -m
        loss += m
    return loss / dist.size, grad / dist.size


def make_case(shape, dtype, device, contiguous, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dist = (torch.rand(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    parity = torch.randint(0, 2, shape, generator=generator).to(dtype)
    parity.view(-1)[::7] = 255
    parity.view(-1)[3::11] = 2.0          # any non-zero parity means "same"
    dist, parity = dist.to(device), parity.to(device)
    if not contiguous:
        dist = dist.transpose(2, 3).contiguous().transpose(2, 3)
        parity = parity.transpose(2, 3).contiguous().transpose(2, 3)
    return dist.requires_grad_(True), parity


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("shape", [(1, 9, 5, 6), (3, 4, 7, 5)])
@pytest.mark.parametrize("ignore_label", [None, 255])
@pytest.mark.parametrize("loss_weight", [1.0, 3.0])
def test_matches_reference(device, dtype, contiguous, shape, ignore_label, loss_weight):
    dist, parity = make_case(shape, dtype, device, contiguous)
    loss = dist_loss(dist, parity, 0.5, 2.0, ignore_label=ignore_label)
    (loss_weight * loss).backward()
    expected_loss, expected_grad = reference_dist_loss(dist, parity, 0.5, 2.0, ignore_label)
    assert loss.shape == () and loss.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    assert abs(loss.item() - expected_loss) <= tolerance * max(1.0, expected_loss)
    # the original ignores loss_weight in backward: the gradient is the same for 1 and 3
    np.testing.assert_allclose(dist.grad.double().cpu().numpy().ravel(), expected_grad,
                               rtol=tolerance, atol=tolerance)


def test_zero_loss_weight_gives_no_gradient():
    dist, parity = make_case((1, 4, 3, 3), torch.float32, "cpu", True)
    (0.0 * dist_loss(dist, parity, 0.5, 2.0)).backward()
    assert torch.equal(dist.grad, torch.zeros_like(dist))


def test_parity_gets_no_gradient():
    dist, parity = make_case((1, 4, 3, 3), torch.float64, "cpu", True)
    parity.requires_grad_(True)
    dist_loss(dist, parity, 0.5, 2.0).backward()
    assert parity.grad is None


@pytest.mark.needs_cuda
def test_cuda_matches_cpu():
    results = []
    for device in ("cpu", "cuda"):
        dist, parity = make_case((3, 9, 11, 7), torch.float64, device, True)
        loss = dist_loss(dist, parity, 0.3, 1.7, ignore_label=255)
        loss.backward()
        results.append((loss.detach().cpu(), dist.grad.cpu()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ignore_label", [None, 255])
def test_cuda_source_matches_cpu_path(monkeypatch, ignore_label):
    """The CuPy kernel, compiled as C++ and run on one CPU thread, against the CPU path."""
    emulate_cuda_launch(monkeypatch)
    module = sys.modules["segaware_caffe.kernels.dist_loss"]
    dist, parity = make_case((2, 9, 5, 4), torch.float64, "cpu", True)
    dist = dist.detach()
    for emulated, reference in zip(
            module._dist_loss_terms_cuda(dist, parity, 0.5, 2.0, ignore_label),
            module._dist_loss_terms_cpu(dist, parity, 0.5, 2.0, ignore_label)):
        assert torch.equal(emulated, reference)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_chain(golden, case):
    """weighted_avg -> Im2dist L1 -> DistLoss with Im2parity of the label, as config/embs wires
    it: the loss, the parity, and the gradients reaching Im2dist's top and bottom."""
    folder = golden / "layers" / case
    data = np.load(folder / "data.npz")
    layers = {p.name: p for p in read_net(folder / "net.prototxt").layer}
    embedding = torch.from_numpy(data["out/weighted_avg"].copy()).requires_grad_(True)
    labels = torch.from_numpy(data["in/label"].copy())
    parity = build_layer(layers["parity"], [labels.shape])(labels)
    np.testing.assert_array_equal(parity.numpy(), data["out/parity"])
    dist = build_layer(layers["weighted_avg_dist"], [embedding.shape])(embedding)
    dist.retain_grad()
    loss_layer = build_layer(layers["loss_avg"], [dist.shape, parity.shape])
    loss = loss_layer(dist, parity)
    loss.backward()
    for what, got, key in (("loss", loss, "out/loss_avg"), ("dist", dist, "out/weighted_avg_dist"),
                           ("gradient of dist", dist.grad, "diff/weighted_avg_dist"),
                           ("gradient of the embedding", embedding.grad, "diff/weighted_avg")):
        assert_golden_close(got, data[key], f"{case} {what}")


def test_layer_reads_params():
    layer = build_layer('name: "loss" type: "DistLoss" bottom: "d" bottom: "p" top: "loss" '
                        'convolution_param { kernel_size: 3 } '
                        'dist_loss_param { alpha: 0.5 beta: 2 ignore_label: 255 }',
                        [(2, 9, 4, 4), (2, 9, 4, 4)])
    assert (layer.alpha, layer.beta, layer.ignore_label) == (0.5, 2.0, 255)
    assert layer.IS_LOSS and layer.output_shapes([(2, 9, 4, 4), (2, 9, 4, 4)]) == [()]
    assert repr(layer).endswith("(alpha=0.5, beta=2, ignore_label=255)")


@pytest.mark.parametrize("text, shapes, message", [
    ('dist_loss_param { alpha: 0.5 beta: 2 }', None,
     "convolution_param with kernel_size is required"),
    ('convolution_param { pad: 1 } dist_loss_param { alpha: 0.5 beta: 2 }', None,
     "kernel_size is required"),
    ('convolution_param { kernel_size: 3 } dist_loss_param { beta: 2 }', None,
     "dist_loss_param.alpha required"),
    ('convolution_param { kernel_size: 3 }', None, "dist_loss_param.alpha and beta required"),
    ('convolution_param { kernel_size: 3 } dist_loss_param { alpha: 2 beta: 2 }', None,
     "beta > alpha > 0, got alpha 2, beta 2"),
    ('convolution_param { kernel_size: 3 } dist_loss_param { alpha: -1 beta: 2 }', None,
     "beta > alpha > 0"),
    ('convolution_param { kernel_size: 3 } dist_loss_param { alpha: 0.5 beta: 2 }',
     [(2, 9, 4, 4), (1, 9, 4, 4)], "same num"),
    ('convolution_param { kernel_size: 3 } dist_loss_param { alpha: 0.5 beta: 2 }',
     [(2, 9, 4, 4), (2, 9, 4, 3)], "as many elements"),
])
def test_layer_errors_name_the_layer(text, shapes, message):
    shapes = shapes or [(1, 9, 4, 4), (1, 9, 4, 4)]
    with pytest.raises(LayerSetupError, match=rf"loss1 \(DistLoss\): .*{message}"):
        build_layer(f'name: "loss1" type: "DistLoss" bottom: "d" bottom: "p" top: "l" {text}',
                    shapes)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(parity=torch.zeros(5)), ValueError, "as many elements as dist"),
    (dict(alpha=2.0, beta=1.0), ValueError, "0 < alpha < beta"),
    (dict(dist=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "float32 or float64"),
    (dict(dist=torch.zeros(0), parity=torch.zeros(0)), ValueError, "empty"),
    (dict(ignore_label="255"), ValueError, "ignore_label must be an int"),
])
def test_functional_rejects_bad_inputs(kwargs, error, message):
    arguments = dict(dist=torch.zeros(2, 3), parity=torch.zeros(2, 3), alpha=0.5, beta=2.0)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        dist_loss(**arguments)


def test_embedding_chain_end_to_end_on_random_data():
    """im2parity and im2dist feeding dist_loss, as the embs configs do, gives a finite loss and a
    gradient only where the hinge is active."""
    emb = torch.randn(2, 4, 9, 8, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 9, 8)).float()
    loss = dist_loss(im2dist(emb, 3, pad=1, norm="L1"), im2parity(labels, 3, pad=1), 0.5, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad.abs().sum() > 0
