"""DistLoss over a batch with ignored taps and a loss weight."""

import numpy as np
import torch


from tests.layers.helpers import build
from tests.tolerances import assert_close


def test_dist_loss_batch_with_ignored_taps_and_loss_weight():
    rng = np.random.default_rng(4)
    dist = rng.uniform(0, 3, (3, 9, 4, 5)).astype(np.float32)
    parity = rng.choice([0, 1, 255], dist.shape).astype(np.float32)
    layer = build('name: "l" type: "DistLoss" bottom: "d" bottom: "p" top: "l" convolution_param '
                  '{ kernel_size: 3 } dist_loss_param { alpha: 0.5 beta: 2 ignore_label: 255 }',
                  [dist.shape, parity.shape])
    margin = np.where(parity == 255, 0, np.where(parity != 0, np.maximum(dist - 0.5, 0),
                                                 np.maximum(2 - dist, 0)))
    dt = torch.tensor(dist, requires_grad=True)
    loss = layer(dt, torch.tensor(parity))
    (3 * loss).backward()                    # loss_weight 3: the original ignores it in backward
    assert_close(loss, margin.sum() / dist.size, "loss")
    assert_close(dt.grad, np.where(parity != 0, margin, -margin) / dist.size, "diff")
