"""Embed: a learned lookup table indexed by the bottom's values (one-hot InnerProduct)."""
import torch
from torch import nn

from ..fillers import fill_parameter
from ..layer import CaffeLayer, register_layer
from .convolution import optional_filler


@register_layer("Embed")
class Embed(CaffeLayer):
    """y[i...] = W[int(idx[i...])] + b for every value of the index bottom (any shape); the top
    has the bottom's shape plus a last axis of num_output. W is (input_dim, num_output) (the
    transpose of InnerProduct's), b (num_output) with bias_term; both default to constant 0.
    Indices are truncated to int and must lie in [0, input_dim). Backward: rows of W accumulate
    the gradients of every position that picked them, b their sum; none to the indices."""
    CAFFE_BLOBS = ("weight", "bias")
    NO_GRAD_BOTTOMS = (0,)

    def __init__(self, *, num_output, input_dim, bias_term=True, where="Embed"):
        super().__init__()
        self.weight = self.new_parameter((input_dim, num_output), "weight")
        self.bias = self.new_parameter((num_output,), "bias") if bias_term else None
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.embed_param
        for field in ("num_output", "input_dim"):
            if getattr(p, field) <= 0:
                raise ctx.error(f"embed_param.{field} must be > 0, got {getattr(p, field)}")
        layer = cls(num_output=int(p.num_output), input_dim=int(p.input_dim),
                    bias_term=bool(p.bias_term), where=f"{ctx.name} ({ctx.type})")
        fill_parameter(layer.weight, optional_filler(p, "weight_filler"), ctx)
        if layer.bias is not None:
            fill_parameter(layer.bias, optional_filler(p, "bias_filler"), ctx)
        return layer

    def forward(self, indices):
        index = indices.detach().to(torch.int64)          # C++ static_cast<int>: truncation
        bad = (index < 0) | (index >= self.weight.shape[0])
        if bool(bad.any()):
            raise ValueError(f"{self.where}: index {indices.detach()[bad].flatten()[0].item():g} is "
                             f"outside [0, {self.weight.shape[0]}) (embed_param.input_dim)")
        y = nn.functional.embedding(index, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0]) + (self.weight.shape[1],)]

    def extra_repr(self):
        text = f"input_dim={self.weight.shape[0]}, num_output={self.weight.shape[1]}"
        return text + (", bias_term=False" if self.bias is None else "")
