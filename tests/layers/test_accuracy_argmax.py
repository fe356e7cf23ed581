"""Accuracy (top_k, ignore_label, per-class top) and ArgMax."""

import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import build, randn


def test_accuracy_top_k_ignore_and_per_class():
    layer = build('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" top: "per_class" '
                  'accuracy_param { top_k: 2 ignore_label: -1 }', [(5, 3), (5,)])
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.2, 0.6],
                           [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]], requires_grad=True)
    labels = torch.tensor([0.0, 2.0, 0.0, 1.0, -1.0])
    acc, per_class = layer(scores, labels)
    # item 0: label 0 ranks 3rd; item 1: label 2 ties class 1, higher class ranks first -> 2nd;
    # item 2: label 0 ties class 1 at 0.2, class 1 ranks above -> 3rd; item 3: 2nd; item 4 ignored
    assert acc.shape == () and acc.item() == pytest.approx(2 / 4)
    assert per_class.tolist() == [0.0, 1.0, 1.0]
    assert not acc.requires_grad        # forward only: no graph kept (the net refuses a gradient)
    top1 = build('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc"', [(5, 3), (5,)])
    assert top1(scores, torch.tensor([1.0, 0, 2, 2, 0])).item() == pytest.approx(4 / 5)
    spatial = build('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc"', [(2, 3, 4, 5), (2, 1, 4, 5)])
    x = randn(2, 3, 4, 5)
    assert spatial(x, x.argmax(1, keepdim=True).double()).item() == 1.0
    with pytest.raises(LayerSetupError, match=r"a \(Accuracy\): accuracy_param.top_k must be in 1..3"):
        build('name: "a" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" accuracy_param { top_k: 4 }',
              [(5, 3), (5,)])


def test_argmax_with_axis_values_and_ties():
    x = torch.tensor([[[1.0, 3.0, 3.0, 0.0]], [[2.0, 2.0, 5.0, 5.0]]])      # (2, 1, 4)
    indices = build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: 2 top_k: 2 }', [x.shape])
    assert indices(x).tolist() == [[[2.0, 1.0]], [[3.0, 2.0]]]             # ties: higher index first
    values = build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: -1 out_max_val: true }',
                   [x.shape])
    assert values(x).tolist() == [[[3.0]], [[5.0]]]
    flat = build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 3 out_max_val: true }',
                 [x.shape])
    y = flat(x)
    assert y.shape == (2, 2, 3) and y[1].tolist() == [[3.0, 2.0, 1.0], [5.0, 5.0, 2.0]]
    assert build('name: "m" type: "ArgMax" bottom: "x" top: "y"', [(4, 6)])(torch.eye(4, 6)).shape == (4, 1, 1)
    with pytest.raises(LayerSetupError, match=r"m \(ArgMax\): argmax_param.top_k 5 exceeds the size 4 of axis 2"):
        build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: 2 top_k: 5 }', [x.shape])
    with pytest.raises(LayerSetupError, match=r"top_k 5 exceeds the 4 values per item"):
        build('name: "m" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 5 }', [x.shape])
