"""SegAccuracy (DeepLab v2): pixel accuracy, mean recall and mean IoU from a confusion matrix."""
import torch

from ..layer import CaffeLayer, register_layer


@register_layer("SegAccuracy")
class SegAccuracy(CaffeLayer):
    """Bottoms: scores (N, C, H, W) and labels (N, 1, H, W). Predicted class = argmax over channels
    with ties going to the highest class; labels are int()-truncated and those in ignore_labels
    skipped. A C x C (actual, predicted) confusion matrix is cleared at every forward (reset
    true) or accumulated across forwards (reset false). Top (1, 1, 1, 3) = [pixel accuracy,
    mean recall over classes present in the labels, mean IoU over all C classes with IoU 1 where
    intersection == union]. Forward only."""
    BOTTOMS = (2, 2)
    HAS_BACKWARD = False

    def __init__(self, *, ignore_labels=(), reset=True, num_classes=0, where="SegAccuracy"):
        super().__init__()
        self.ignore_labels = tuple(ignore_labels)
        self.reset = reset
        self.where = where
        # accumulated counts (int64) when reset is false; a buffer so .to(device) moves it
        confusion = self.new_tensor((num_classes, num_classes), "confusion matrix",
                                    dtype=torch.int64)
        self.register_buffer("confusion", confusion, persistent=False)
        if not reset:
            self.HAS_SIDE_EFFECTS = True  # the matrix carries state from one forward to the next

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.seg_accuracy_param
        scores, labels = (tuple(s) for s in ctx.bottom_shapes)
        if len(scores) != 4 or len(labels) != 4:
            raise ctx.error(f"expects 4-D scores (N, C, H, W) and labels (N, 1, H, W), got "
                            f"{scores} and {labels}")
        if labels[1] != 1 or (labels[0], labels[2], labels[3]) != (scores[0], scores[2], scores[3]):
            raise ctx.error(f"labels must have shape (N, 1, H, W) = {(scores[0], 1, *scores[2:])} "
                            f"to match scores {scores}, got {labels}")
        return cls(ignore_labels=[int(v) for v in p.ignore_label], reset=bool(p.reset),
                   num_classes=scores[1], where=f"{ctx.name} ({ctx.type})")

    @torch.no_grad()        # the original has no backward: keep no graph
    def forward(self, scores, labels):
        channels = scores.shape[1]
        # argmax returns the first maximum; flipping the channels makes that the highest class
        predicted = (channels - 1) - scores.flip(1).argmax(1)
        actual = labels[:, 0].to(torch.int64)
        counted = torch.ones_like(actual, dtype=torch.bool)
        for ignored in self.ignore_labels:
            counted &= actual != ignored
        actual, predicted = actual[counted], predicted[counted]
        bad = (actual < 0) | (actual >= channels)
        if bool(bad.any()):
            raise ValueError(f"{self.where}: unexpected label {int(actual[bad][0])}: expected "
                             f"0..{channels - 1} or one of the ignore_labels {list(self.ignore_labels)}")
        confusion = torch.bincount(actual * channels + predicted,
                                   minlength=channels * channels).reshape(channels, channels)
        if not self.reset:
            if self.confusion.shape != confusion.shape:
                self.confusion = torch.zeros_like(confusion)
            self.confusion += confusion
            confusion = self.confusion
        return _scores(confusion.to(torch.float64)).to(scores.dtype).reshape(1, 1, 1, 3)

    def reset_confusion(self):
        """Forget what earlier forwards accumulated (reset false)."""
        self.confusion.zero_()

    def output_shapes(self, bottom_shapes):
        return [(1, 1, 1, 3)]

    def extra_repr(self):
        return f"ignore_labels={list(self.ignore_labels)}, reset={self.reset}"


def _scores(confusion):
    """[pixel accuracy, mean recall, mean IoU] of a (actual, predicted) confusion matrix."""
    total = confusion.sum()
    correct = confusion.diagonal()
    actual_totals, predicted_totals = confusion.sum(1), confusion.sum(0)
    accuracy = correct.sum() / total if total > 0 else confusion.new_zeros(())
    present = actual_totals > 0
    recall = (correct[present] / actual_totals[present]).mean() if present.any() \
        else confusion.new_zeros(())
    union = actual_totals + predicted_totals - correct
    iou = torch.where(union == correct, torch.ones_like(union), correct / union.clamp(min=1))
    return torch.stack([accuracy, recall, iou.mean()])
