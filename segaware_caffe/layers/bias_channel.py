"""BiasChannel (DeepLab weak supervision): add a constant to the score channels of the labels
present in an image (IMAGE labels) or at each pixel (PIXEL labels)."""
import torch

from ..layer import CaffeLayer, register_layer

_LABEL_TYPES = {1: "IMAGE", 2: "PIXEL"}   # BiasChannelParameter.LabelType


class _AddBias(torch.autograd.Function):
    """scores + bias(labels); the gradient passes to the scores unchanged. The labels stay in the
    graph (with no gradient) so that a gradient asked of them meets the builder's refusal."""

    @staticmethod
    def forward(ctx, scores, labels, bias_of):
        return bias_of(scores, labels)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


@register_layer("BiasChannel")
class BiasChannel(CaffeLayer):
    """Bottoms: scores (N, C, H, W) and labels. Labels are int()-truncated; -1 and the
    ignore_labels are skipped; any other value outside [0, C) is an error.

    IMAGE labels (N, L, 1, 1): for each listed label l, the whole channel l gets +bg_bias if l is 0
    and +fg_bias otherwise (a label listed twice is added twice). PIXEL labels (N, 1, H, W): at a
    pixel labelled l, with a background label b (when background_label or bg_bias is given) the
    channel b gets +bg_bias, and if l != b the channel l gets +fg_bias as well; without one, only
    channel l gets +fg_bias. The gradient passes to the scores unchanged; the labels refuse one.
    """
    BOTTOMS = (2, 2)
    NO_GRAD_BOTTOMS = (1,)

    def __init__(self, *, bg_bias=1.0, fg_bias=2.0, ignore_labels=(), label_type="IMAGE",
                 background_label=None, where="BiasChannel"):
        super().__init__()
        self.bg_bias, self.fg_bias = float(bg_bias), float(fg_bias)
        # -1 pads UniqueLabel's list: always skipped
        self.ignore_labels = tuple(sorted({-1, *(int(v) for v in ignore_labels)}))
        self.label_type = label_type
        self.background_label = background_label      # PIXEL only; None = no background label
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.bias_channel_param
        if p.bg_bias < 0 or p.fg_bias < 0:
            raise ctx.error(f"bias_channel_param.bg_bias and fg_bias must be >= 0, got "
                            f"{p.bg_bias:g} and {p.fg_bias:g}")
        label_type = _LABEL_TYPES.get(p.label_type)
        if label_type is None:
            raise ctx.error(f"bias_channel_param.label_type must be IMAGE or PIXEL, got {p.label_type}")
        scores, labels = (tuple(s) for s in ctx.bottom_shapes)
        if len(scores) != 4 or len(labels) != 4:
            raise ctx.error(f"expects 4-D scores (N, C, H, W) and labels, got {scores} and {labels}")
        if labels[0] != scores[0]:
            raise ctx.error(f"scores {scores} and labels {labels} must have the same batch size")
        if label_type == "IMAGE":
            if labels[1] < 1 or labels[2:] != (1, 1):
                raise ctx.error(f"IMAGE labels must have shape (N, L, 1, 1) with L >= 1, got {labels}")
        elif labels[1:] != (1, *scores[2:]):
            raise ctx.error(f"PIXEL labels must have shape (N, 1, H, W) = "
                            f"{(scores[0], 1, *scores[2:])}, got {labels}")
        background = None
        # the original assumes a background label when either field is given explicitly
        if p.HasField("background_label") or p.HasField("bg_bias"):
            background = int(p.background_label)
            if label_type == "PIXEL" and not 0 <= background < scores[1]:
                raise ctx.error(f"bias_channel_param.background_label must be a channel, 0..{scores[1] - 1}, "
                                f"got {background}")
        return cls(bg_bias=float(p.bg_bias), fg_bias=float(p.fg_bias), ignore_labels=list(p.ignore_label),
                   label_type=label_type, background_label=background, where=f"{ctx.name} ({ctx.type})")

    def _used(self, label, channels):
        """(used mask, truncated labels); raises on a used label outside [0, channels)."""
        label = torch.trunc(label.detach()).to(torch.int64)
        used = torch.ones_like(label, dtype=torch.bool)
        for ignored in self.ignore_labels:
            used &= label != ignored
        bad = used & ((label < 0) | (label >= channels))
        if bool(bad.any()):
            raise ValueError(f"{self.where}: unexpected label {int(label[bad][0])}: expected 0..{channels - 1}, "
                             f"-1 or one of the ignore_labels {[v for v in self.ignore_labels if v != -1]}")
        return used, label

    def forward(self, scores, labels):
        return _AddBias.apply(scores, labels, self._biased)

    def _biased(self, scores, labels):
        channels = scores.shape[1]
        classes = torch.arange(channels, device=scores.device).reshape(1, channels, 1, 1)
        zero = scores.new_zeros(())
        y = scores
        if self.label_type == "IMAGE":
            used, label = self._used(labels.reshape(labels.shape[0], -1), channels)
            # one addition per listed label, in list order, as the original adds them
            for j in range(label.shape[1]):
                hit = (classes == label[:, j].reshape(-1, 1, 1, 1)) & used[:, j].reshape(-1, 1, 1, 1)
                bias = torch.where(label[:, j] == 0, self.bg_bias, self.fg_bias).to(scores.dtype)
                y = y + torch.where(hit, bias.reshape(-1, 1, 1, 1), zero)
            return y
        used, label = self._used(labels, channels)        # (N, 1, H, W)
        if self.background_label is not None:
            bg = self.background_label
            y = y + torch.where((classes == bg) & used, scores.new_tensor(self.bg_bias), zero)
            fg = used & (label != bg) & (classes == label)
        else:
            fg = used & (classes == label)
        return y + torch.where(fg, scores.new_tensor(self.fg_bias), zero)

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def extra_repr(self):
        return (f"label_type={self.label_type}, bg_bias={self.bg_bias:g}, fg_bias={self.fg_bias:g}, "
                f"ignore_labels={list(self.ignore_labels)}, background_label={self.background_label}")
