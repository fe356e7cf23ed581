"""UniqueLabel (DeepLab): the sorted set of label values present in each image."""
import torch

from ..layer import CaffeLayer, register_layer


@register_layer("UniqueLabel")
class UniqueLabel(CaffeLayer):
    """Bottom: labels (N, 1, H, W). Top (N, max_labels, 1, 1): per image, the distinct values
    present (those whose int() truncation is an ignore_label left out) together with the
    force_label values, in increasing order, padded with -1. More distinct values than max_labels
    is an error, as in the original. Forward only (the original aborts when asked for a gradient).
    """
    HAS_BACKWARD = False

    def __init__(self, *, max_labels, ignore_labels=(), force_labels=(), where="UniqueLabel"):
        super().__init__()
        self.max_labels = max_labels
        self.ignore_labels = tuple(ignore_labels)
        self.force_labels = tuple(sorted(set(force_labels)))
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.unique_label_param
        if not p.HasField("max_labels"):
            raise ctx.error("unique_label_param.max_labels is required (the length of the top)")
        # force_label is a float field: the set of distinct float values is what counts
        forced = sorted({float(torch.tensor(v, dtype=torch.float32)) for v in p.force_label})
        if p.max_labels <= len(forced):
            raise ctx.error(f"unique_label_param.max_labels must be > the number of distinct "
                            f"force_label values ({len(forced)}): at least one label more than the "
                            f"forced ones needs to fit, got {p.max_labels}")
        shape = tuple(ctx.bottom_shapes[0])
        if len(shape) != 4 or shape[1] != 1:
            raise ctx.error(f"the bottom must be labels of shape (N, 1, H, W), got {shape}")
        return cls(max_labels=int(p.max_labels), ignore_labels=[int(v) for v in p.ignore_label],
                   force_labels=forced, where=f"{ctx.name} ({ctx.type})")

    def forward(self, labels):
        with torch.no_grad():       # the original has no backward: keep no graph
            return self._unique(labels)

    def _unique(self, labels):
        n = labels.shape[0]
        values = labels.reshape(n, -1)
        # the original looks values up in an int set: a value counts as ignored when its C++
        # int() truncation is one of the ignore labels
        ignored = torch.zeros_like(values, dtype=torch.bool)
        truncated = torch.trunc(values)
        for label in self.ignore_labels:
            ignored |= truncated == label
        forced = torch.tensor(self.force_labels, dtype=labels.dtype, device=labels.device)
        # every image at once: ignored values become NaN, which sorts last and is no label
        work = torch.cat([values.masked_fill(ignored, float("nan")),
                          forced.expand(n, forced.numel())], dim=1)
        ordered = torch.sort(work, dim=1).values
        first = ~torch.isnan(ordered)               # the first of each run of equal values
        first[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
        counts = first.sum(dim=1)
        over = torch.nonzero(counts > self.max_labels)
        if over.numel():
            image = int(over[0, 0])
            present = ordered[image][first[image]]
            raise ValueError(f"{self.where}: image {image} has {present.numel()} distinct labels "
                             f"{present.tolist()}, more than max_labels {self.max_labels}")
        top = torch.full((n, self.max_labels), -1.0, dtype=labels.dtype, device=labels.device)
        rows, columns = torch.nonzero(first, as_tuple=True)
        top[rows, first.cumsum(dim=1)[rows, columns] - 1] = ordered[rows, columns]
        return top.reshape(n, self.max_labels, 1, 1)

    def output_shapes(self, bottom_shapes):
        return [(bottom_shapes[0][0], self.max_labels, 1, 1)]

    def extra_repr(self):
        return (f"max_labels={self.max_labels}, ignore_labels={list(self.ignore_labels)}, "
                f"force_labels={list(self.force_labels)}")
