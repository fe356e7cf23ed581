"""DomainTransform and DomainTransformForwardOnly (DeepLab): edge-preserving recursive filtering
of a feature map guided by a reference gradient, over each image's valid region."""
import math

import torch

from segaware_caffe.kernels.domain_transform import domain_transform

from .. import limits
from ..layer import CaffeLayer, register_layer


@register_layer("DomainTransform")
class DomainTransform(CaffeLayer):
    """Bottoms: x (N, C, H, W), reference gradient g (N, 1, H, W), dims (N, 2, 1, 1) = the valid
    (h, w) of each image (int()-truncated, at most (H, W)). num_iter rounds of four recursive
    passes with sigma_i = spatial_sigma * sqrt(3) * 2^(T-i-1) / sqrt(4^T - 1) and weights
    clamp(exp(-sqrt(2)/sigma_i * (1 + g * spatial_sigma / range_sigma)), min_weight, 1); outside
    the valid region the top is x. Backward: to x and g as the original computes it (the clamp is
    not differentiated); dims refuses a gradient."""
    BOTTOMS = (3, 3)
    NO_GRAD_BOTTOMS = (2,)

    def __init__(self, *, num_iter=3, spatial_sigma=50.0, range_sigma=5.0, min_weight=0.0):
        super().__init__()
        self.num_iter = num_iter
        self.spatial_sigma, self.range_sigma = float(spatial_sigma), float(range_sigma)
        self.min_weight = float(min_weight)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.domain_transform_param
        if p.spatial_sigma <= 0:
            raise ctx.error(f"domain_transform_param.spatial_sigma must be > 0, got {p.spatial_sigma:g}")
        if p.range_sigma <= 0:
            raise ctx.error(f"domain_transform_param.range_sigma must be > 0, got {p.range_sigma:g}")
        if p.min_weight < 0:
            raise ctx.error(f"domain_transform_param.min_weight must be >= 0, got {p.min_weight:g}")
        if p.num_iter <= 0:
            raise ctx.error(f"domain_transform_param.num_iter must be > 0, got {p.num_iter}")
        limits.check(p.num_iter, "layer_iterations", "domain_transform_param.num_iter",
                     f"{ctx.name} ({ctx.type})")
        x, g, dims = (tuple(s) for s in ctx.bottom_shapes)
        if len(x) != 4:
            raise ctx.error(f"bottom 0 (the input to filter) must be (N, C, H, W), got {x}")
        if g != (x[0], 1, x[2], x[3]):
            raise ctx.error(f"bottom 1 (the reference gradient) must be {(x[0], 1, x[2], x[3])}, got {g}")
        if not dims or dims[0] != x[0] or (x[0] and math.prod(dims) // dims[0] < 2):
            raise ctx.error(f"bottom 2 (the valid sizes) must hold (h, w) per image, (N, 2, 1, 1) "
                            f"with N = {x[0]}, got {dims}")
        return cls(num_iter=int(p.num_iter), spatial_sigma=p.spatial_sigma,
                   range_sigma=p.range_sigma, min_weight=p.min_weight)

    def forward(self, x, g, dims):
        return domain_transform(x, g, dims, num_iter=self.num_iter, spatial_sigma=self.spatial_sigma,
                                range_sigma=self.range_sigma, min_weight=self.min_weight)

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def forward_workspace(self, bottom_shapes, top_shapes, itemsize):
        # per iteration the weights and, for the backward, four copies of the scanned input (the
        # differences of each pass), plus the transposed working copies
        n, c, h, w = bottom_shapes[0]
        image = n * c * h * w * itemsize
        return self.num_iter * (4 * image + n * h * w * itemsize) + 3 * image

    def extra_repr(self):
        return (f"num_iter={self.num_iter}, spatial_sigma={self.spatial_sigma:g}, "
                f"range_sigma={self.range_sigma:g}, min_weight={self.min_weight:g}")


@register_layer("DomainTransformForwardOnly")
class DomainTransformForwardOnly(DomainTransform):
    """The same forward as DomainTransform; the original has no backward (it is commented out)."""
    TYPE = "DomainTransformForwardOnly"
    HAS_BACKWARD = False
    NO_GRAD_BOTTOMS = ()

    def forward(self, x, g, dims):
        with torch.no_grad():       # the original has no backward: keep no graph
            return super().forward(x, g, dims)

