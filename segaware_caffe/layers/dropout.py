"""Dropout (inverted): scale at train time, identity at test time."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer


@register_layer("Dropout")
class Dropout(CaffeLayer):
    """TRAIN: y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p), the same mask and scale in
    backward. TEST: y = x. The phase is the layer's (its own `phase` field, else the net's)."""
    SAME_SHAPE = True

    def __init__(self, *, dropout_ratio=0.5, train=False):
        super().__init__()
        self.dropout_ratio = dropout_ratio
        self.train_phase = train
        self.scale = float(np.float32(1) / (np.float32(1) - np.float32(dropout_ratio)))

    @classmethod
    def from_proto(cls, layer_param, ctx):
        ratio = float(np.float32(layer_param.dropout_param.dropout_ratio))
        if not 0 <= ratio < 1:
            raise ctx.error(f"dropout_param.dropout_ratio must be in [0, 1), got {ratio}")
        return cls(dropout_ratio=ratio, train=ctx.phase == "TRAIN")

    def forward(self, x):
        if not self.train_phase:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.dropout_ratio
        return x * keep.to(x.dtype) * self.scale

    def extra_repr(self):
        ratio = f"dropout_ratio={self.dropout_ratio}, " if self.dropout_ratio != 0.5 else ""
        return f"{ratio}phase={'TRAIN' if self.train_phase else 'TEST'}"
