"""SmoothL1Loss (Fast/Faster R-CNN): the Huber-like box regression loss. The original has only
GPU code for this layer; this follows it."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer
from ..params import legacy_shape


class _SmoothL1Function(torch.autograd.Function):
    """On d = w (b0 - b1): f(d) = 0.5 (sigma d)^2 if |d| < 1/sigma^2 else |d| - 0.5/sigma^2,
    loss = sum f / (N H W). Backward: f'(d) = sigma^2 d or sign(d), times -/+ 1/(N H W) for
    the two bottoms -- not multiplied by w again (the original's gradient; the exact one for
    weights of 0 and 1)."""

    @staticmethod
    def forward(ctx, a, b, weights, sigma2, normalizer):
        d = a - b
        if weights is not None:
            d = weights * d
        absd = torch.abs(d)
        small = absd < 1.0 / sigma2
        errors = torch.where(small, 0.5 * sigma2 * d * d, absd - 0.5 / sigma2)
        ctx.save_for_backward(d, small)
        ctx.sigma2, ctx.normalizer = sigma2, normalizer
        return torch.abs(errors).sum() / normalizer

    @staticmethod
    def backward(ctx, grad):
        d, small = ctx.saved_tensors
        slope = torch.where(small, ctx.sigma2 * d, torch.sign(d))
        grad_a = slope * (grad / ctx.normalizer)
        return (grad_a if ctx.needs_input_grad[0] else None,
                -grad_a if ctx.needs_input_grad[1] else None, None, None, None)


@register_layer("SmoothL1Loss")
class SmoothL1Loss(CaffeLayer):
    """Bottoms predictions, targets and optional per-element weights w, all of the same
    (legacy) shape (N, C, H, W). d = w (b0 - b1); loss = sum over elements of 0.5 d^2 if |d| < 1
    else |d| - 0.5, divided by N*H*W. Gradients f'(d) = d or sign(d) over N*H*W to b0, the
    opposite to b1, without a factor w; none to the weights. `sigma` (1 in the original, which
    has no parameter for it) generalises the kink to |d| = 1/sigma^2 as in py-faster-rcnn; it
    is read from smooth_l1_loss_param.sigma where the schema has that message."""
    BOTTOMS = (2, 3)
    IS_LOSS = True
    NO_GRAD_BOTTOMS = (2,)
    NO_FORCE_BACKWARD = ()       # force_backward is allowed into every bottom (then refused at 2)

    def __init__(self, *, sigma=1.0):
        super().__init__()
        self.sigma = sigma

    @classmethod
    def from_proto(cls, layer_param, ctx):
        shapes = [legacy_shape(s, ctx, f"bottom {i}") for i, s in enumerate(ctx.bottom_shapes)]
        for i, shape in enumerate(shapes[1:], start=1):
            if shape != shapes[0]:
                raise ctx.error(f"bottom {i} {tuple(ctx.bottom_shapes[i])} must have the shape of "
                                f"bottom 0 {tuple(ctx.bottom_shapes[0])}")
        sigma = 1.0
        if "smooth_l1_loss_param" in layer_param.DESCRIPTOR.fields_by_name \
                and layer_param.HasField("smooth_l1_loss_param"):
            sigma = float(np.float32(layer_param.smooth_l1_loss_param.sigma))
        if not sigma > 0:
            raise ctx.error(f"smooth_l1_loss_param.sigma must be > 0, got {sigma}")
        return cls(sigma=sigma)

    def forward(self, a, b, weights=None):
        shape = tuple(a.shape) + (1,) * (4 - a.dim())
        normalizer = float(shape[0] * shape[2] * shape[3])
        return _SmoothL1Function.apply(a, b.reshape(a.shape),
                                       None if weights is None else weights.reshape(a.shape),
                                       self.sigma * self.sigma, normalizer)

    def output_shapes(self, bottom_shapes):
        return [()]

    def extra_repr(self):
        return f"sigma={self.sigma}" if self.sigma != 1 else ""
