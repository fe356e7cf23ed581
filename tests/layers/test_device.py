"""Layers on CUDA give the CPU numbers."""

import pytest
import torch


from tests.conftest import cpu_and_cuda
from tests.layers.helpers import build, randn, seg_accuracy, softmax_loss


DEVICE_LAYERS = [
    ('type: "Power" power_param { power: 3 scale: 0.5 shift: 2 }', 1), ('type: "BNLL"', 1),
    ('type: "ELU"', 1), ('type: "Exp" exp_param { scale: -1 }', 1), ('type: "AbsVal"', 1),
    ('type: "Eltwise" eltwise_param { operation: MAX }', 3),
    ('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', 2),
    ('type: "Tile" tile_param { tiles: 2 }', 1), ('type: "Softmax"', 1),
    ('type: "ChannelReduce" channel_reduce_param { num_channels: 2 operation: SUM }', 1),
    ('type: "Reduction" reduction_param { operation: ASUM axis: 1 }', 1),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("text, bottoms", DEVICE_LAYERS, ids=[t for t, _ in DEVICE_LAYERS])
def test_layer_on_device_matches_cpu(device, text, bottoms):
    names = " ".join(f'bottom: "b{i}"' for i in range(bottoms))
    layer = build(f'name: "l" {text} {names} top: "y"', [(2, 4, 3, 5)] * bottoms)
    xs = [randn(2, 4, 3, 5, seed=i, dtype=torch.float32) for i in range(bottoms)]
    seed = randn(*layer(*xs).shape, seed=9, dtype=torch.float32)
    results = []
    for dev in ("cpu", device):
        inputs = [x.to(dev).requires_grad_(True) for x in xs]
        y = layer.to(dev)(*inputs)
        y.backward(seed.to(dev))
        results.append([y.detach().cpu()] + [x.grad.cpu() for x in inputs])
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_seg_accuracy_and_softmax_loss_on_device_match_cpu():
    for device in [d for d in ("cuda",) if torch.cuda.is_available()] or ["cpu"]:
        scores = randn(2, 3, 4, 5, dtype=torch.float32).to(device)
        labels = torch.randint(0, 3, (2, 1, 4, 5), generator=torch.Generator().manual_seed(2)).float()
        labels[0, 0, 0, 0] = 255
        acc = seg_accuracy("ignore_label: 255", scores.shape).to(device)(scores, labels.to(device))
        loss = softmax_loss("ignore_label: 255", shape=(2, 3, 4, 5))(scores, labels.to(device))
        torch.testing.assert_close(acc.cpu(), seg_accuracy("ignore_label: 255", scores.shape)(scores.cpu(), labels))
        torch.testing.assert_close(loss.cpu(), softmax_loss("ignore_label: 255", shape=(2, 3, 4, 5))(scores.cpu(), labels))
