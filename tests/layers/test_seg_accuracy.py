"""The fork's SegAccuracy: the confusion matrix, ties, ignored pixels, accumulation."""

import numpy as np
import pytest
import torch

from segaware_caffe import LayerSetupError

from tests.layers.helpers import randn, seg_accuracy


def seg_reference(confusion):
    c = confusion.shape[0]
    correct, actual, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    accuracy = correct.sum() / confusion.sum()
    recall = np.mean([correct[i] / actual[i] for i in range(c) if actual[i]])
    union = actual + predicted - correct
    iou = np.mean([1.0 if union[i] == correct[i] else correct[i] / union[i] for i in range(c)])
    return [accuracy, recall, iou]


def test_seg_accuracy_ties_ignore_and_metrics():
    layer = seg_accuracy("ignore_label: 255 ignore_label: 7", (1, 4, 1, 7))
    per_pixel = torch.tensor([[3.0, 0, 0, 0], [0, 3, 0, 0], [0, 1, 3, 0], [0, 0, 0, 3],
                              [1, 1, 1, 1],          # four-way tie: the highest class (3) wins
                              [5, 0, 0, 0], [0, 0, 0, 0]])
    scores = per_pixel.t().reshape(1, 4, 1, 7)
    labels = torch.tensor([0.0, 1, 1, 3, 3.9, 255, 7]).reshape(1, 1, 1, 7)   # 3.9 truncates to 3
    y = layer(scores, labels)
    assert y.shape == (1, 1, 1, 3) and y.dtype == torch.float32
    confusion = np.zeros((4, 4))
    for a, p in [(0, 0), (1, 1), (1, 2), (3, 3), (3, 3)]:
        confusion[a, p] += 1
    np.testing.assert_allclose(y.flatten().numpy(), seg_reference(confusion), rtol=1e-6)
    # class 2 never appears in the labels: left out of the recall, IoU 0 (predicted once)
    np.testing.assert_allclose(y.flatten().numpy(), [4 / 5, 2.5 / 3, 2.5 / 4], rtol=1e-6)
    assert layer.output_shapes([(1, 4, 1, 7), (1, 1, 1, 7)]) == [(1, 1, 1, 3)]
    with pytest.raises(ValueError, match=r"acc \(SegAccuracy\): unexpected label 4"):
        layer(scores, torch.full((1, 1, 1, 7), 4.0))


def test_seg_accuracy_accumulates_without_reset():
    scores = randn(2, 3, 4, 5, seed=5)
    labels = torch.randint(0, 3, (2, 1, 4, 5), generator=torch.Generator().manual_seed(1)).double()
    fresh = seg_accuracy("", scores.shape)
    assert not fresh.HAS_SIDE_EFFECTS
    first, again = fresh(scores, labels), fresh(scores, labels)
    assert torch.equal(first, again)
    accumulating = seg_accuracy("reset: false", scores.shape)
    assert accumulating.HAS_SIDE_EFFECTS
    accumulating(scores, labels)
    both = accumulating(scores[:1], labels[:1])
    expected = seg_accuracy("", (3, 3, 4, 5))(torch.cat([scores, scores[:1]]), torch.cat([labels, labels[:1]]))
    torch.testing.assert_close(both, expected)
    accumulating.reset_confusion()
    torch.testing.assert_close(accumulating(scores, labels), first)


def test_seg_accuracy_shape_errors():
    with pytest.raises(LayerSetupError, match=r"acc \(SegAccuracy\): labels must have shape \(N, 1, H, W\) = "
                                              r"\(2, 1, 4, 5\) to match scores \(2, 3, 4, 5\), got \(2, 1, 4, 6\)"):
        seg_accuracy("", (2, 3, 4, 5), (2, 1, 4, 6))
