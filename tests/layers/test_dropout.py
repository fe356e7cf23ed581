"""Dropout by phase."""

import numpy as np
import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import build


def test_dropout_test_phase_is_identity_and_train_phase_scales_kept_units():
    text = 'name: "d" type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 0.25 }'
    x = torch.ones(200, 100, requires_grad=True)
    assert build(text, [x.shape], phase="TEST")(x) is x
    torch.manual_seed(0)
    y = build(text, [x.shape], phase="TRAIN")(x)
    kept = y != 0
    assert torch.allclose(y[kept], torch.tensor(1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, kept.float() * np.float32(2 / 0.75))
    with pytest.raises(LayerSetupError, match=r"d \(Dropout\): dropout_param.dropout_ratio must be in \[0, 1\), got 1"):
        build('name: "d" type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 1 }', [(2,)])
