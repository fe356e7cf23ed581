"""AdaptiveBiasChannel (DeepLab weak supervision): raise the scores of the labels present in an
image until each wins a target portion of the pixels."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer


class GlibcRand:
    """The sequence of glibc's rand() (the additive-feedback generator behind random(), TYPE_3),
    started from seed 1 as in a process that never called srand()."""

    def __init__(self, seed=1):
        state = [seed & 0xFFFFFFFF]
        for i in range(1, 31):
            # 16807 * previous mod (2^31 - 1), on signed 32-bit values as glibc computes it
            prev = state[i - 1] - (1 << 32) if state[i - 1] >= 1 << 31 else state[i - 1]
            word = (16807 * prev) % 2147483647
            state.append(word & 0xFFFFFFFF)
        for i in range(31, 34):
            state.append(state[i - 31])
        self._r = state
        for _ in range(310):     # glibc discards the first 310 outputs
            self._step()

    def _step(self):
        r = self._r
        value = (r[-31] + r[-3]) & 0xFFFFFFFF
        r.append(value)
        del r[0]
        return value

    def __call__(self):
        return self._step() >> 1


def random_shuffle(items, rand):
    """std::random_shuffle(first, last) as libstdc++ writes it: for i = 1..n-1 swap item i with
    item rand() % (i + 1). A list of 0 or 1 items draws no number."""
    items = list(items)
    for i in range(1, len(items)):
        j = rand() % (i + 1)
        if i != j:
            items[i], items[j] = items[j], items[i]
    return items


@register_layer("AdaptiveBiasChannel")
class AdaptiveBiasChannel(CaffeLayer):
    """Bottoms: scores (N, C, H, W), labels (N, L, 1, 1) (int()-truncated, -1 = none; others must be
    channels). Per image with at least one label, on the present channels P (sorted, duplicates
    kept):

    1. suppress_others: every score of a channel not in P that is above m = min over P is set to
       m - margin_others;
    2. M = max over P (per pixel); num_iter rounds: for each l in P (background 0 first, then the
       foreground labels in std::random_shuffle order) the channel l is raised by the
       floor(portion * H * W)-th smallest value (0-based) of M - score_l (bg_portion for l = 0,
       fg_portion otherwise), and M updated with the raised channel;
    3. every channel is shifted by mean(M at the start) - mean(M at the end).

    The shuffle uses C's rand(), which the original never seeds: with at most one foreground
    label per image (repeats of one label included) the order does not matter and the result is
    deterministic. With several, this layer draws from its own copy of glibc's rand() sequence,
    started at seed 1 when the layer is built and continued over forwards: the original's order
    in a fresh process in which no other code called rand() before this layer. A portion of 1
    (the largest difference; the original reads one past its buffer there) takes the largest.
    Forward only: the original's Backward writes nothing.
    """
    BOTTOMS = (2, 2)
    HAS_BACKWARD = False

    def __init__(self, *, num_iter=1, bg_portion=0.2, fg_portion=0.2, suppress_others=True,
                 margin_others=1e-5, where="AdaptiveBiasChannel"):
        super().__init__()
        self.num_iter = num_iter
        self.bg_portion, self.fg_portion = float(bg_portion), float(fg_portion)
        self.suppress_others = suppress_others
        self.margin_others = float(margin_others)
        self.where = where
        self.rand = GlibcRand()

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.adaptive_bias_channel_param
        if p.num_iter <= 0:
            raise ctx.error(f"adaptive_bias_channel_param.num_iter must be > 0, got {p.num_iter}")
        if p.margin_others < 0:
            raise ctx.error(f"adaptive_bias_channel_param.margin_others must be >= 0, got {p.margin_others:g}")
        for name in ("bg_portion", "fg_portion"):
            if not 0 <= getattr(p, name) <= 1:
                raise ctx.error(f"adaptive_bias_channel_param.{name} must be in [0, 1], got "
                                f"{getattr(p, name):g}")
        scores, labels = (tuple(s) for s in ctx.bottom_shapes)
        if len(scores) != 4 or scores[1] < 2:
            raise ctx.error(f"scores must be (N, C, H, W) with C > 1, got {scores}")
        if len(labels) != 4 or labels[0] != scores[0] or labels[1] < 1 or labels[2:] != (1, 1):
            raise ctx.error(f"labels must have shape (N, L, 1, 1) with N = {scores[0]} and L >= 1, got {labels}")
        return cls(num_iter=int(p.num_iter), bg_portion=p.bg_portion, fg_portion=p.fg_portion,
                   suppress_others=bool(p.suppress_others), margin_others=p.margin_others,
                   where=f"{ctx.name} ({ctx.type})")

    def _nth(self, label, spatial):
        # float32 product truncated to int, as the original computes it
        portion = self.bg_portion if label == 0 else self.fg_portion
        nth = int(np.float32(portion) * np.float32(spatial))
        return min(nth, spatial - 1)

    def _labels(self, row, channels):
        present = []
        for value in row:
            label = int(value)       # C++ int(): truncation toward zero
            if label == -1:
                continue
            if not 0 <= label < channels:
                raise ValueError(f"{self.where}: unexpected label {label}: expected -1 or 0..{channels - 1}")
            present.append(label)
        return sorted(present)

    def forward(self, scores, labels):
        with torch.no_grad():       # the original has no backward: keep no graph
            return self._adapt(scores, labels)

    def _adapt(self, scores, labels):
        n, channels = scores.shape[:2]
        spatial = scores[0, 0].numel()
        top = scores.clone().reshape(n, channels, -1)
        label_rows = labels.reshape(n, -1).tolist()
        for image in range(n):
            present = self._labels(label_rows[image], channels)
            if not present:
                continue
            x = top[image]                                   # (C, H*W), a view into top
            listed = torch.zeros(channels, dtype=torch.bool, device=x.device)
            listed[present] = True
            if self.suppress_others:
                floor = x[listed].min(0).values
                clip = ~listed.unsqueeze(1) & (x > floor)
                x.copy_(torch.where(clip, floor - x.new_tensor(self.margin_others), x))
            running_max = x[listed].max(0).values
            mean_start = running_max.double().mean()
            bg_first = 1 if present[0] == 0 else 0
            for _ in range(self.num_iter):
                present = present[:bg_first] + random_shuffle(present[bg_first:], self.rand)
                for label in present:
                    diff = running_max - x[label]
                    shift = diff.kthvalue(self._nth(label, spatial) + 1).values
                    x[label] = x[label] + shift
                    running_max = torch.maximum(running_max, x[label])
            mean_end = running_max.double().mean()
            x.copy_(x + (mean_start - mean_end).to(x.dtype))
        return top.reshape(scores.shape)

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def extra_repr(self):
        return (f"num_iter={self.num_iter}, bg_portion={self.bg_portion:g}, fg_portion={self.fg_portion:g}, "
                f"suppress_others={self.suppress_others}, margin_others={self.margin_others:g}")
