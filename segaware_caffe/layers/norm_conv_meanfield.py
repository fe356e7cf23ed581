"""NormConvMeanfield: the segmentation-aware CRF.

Bottoms (4): unary U, initial X0 (both (N, C, H, W), log domain), bilateral features (entry 0 of
the repeated fields), spatial features (entry 1). Top: X_T, not normalised.
Blobs, Caffe order: W_spatial (1,1,C,C) = I, W_bilateral (1,1,C,C) = I, compatibility = -I.

Parameter gradients: the original zeroes the three blob diffs in every backward (overwrites them);
here they accumulate like every other parameter. This differs only when several backward passes
feed one update (iter_size > 1) with lr_mult != 0; the released configs use lr_mult 0.
"""
import torch
from torch import nn

from segaware_caffe.kernels.meanfield import MessageSpec, message_grid_fits, normconv_meanfield

from .. import limits
from ..layer import CaffeLayer, register_layer

_ENTRIES = ("bilateral (entry 0, bottom 2)", "spatial (entry 1, bottom 3)")
_L2 = 2   # NormConvMeanfieldParameter.Norm.L2


def _two_or_default(param, field, default, ctx):
    """The two per-convolution values of a repeated field, or its default twice when absent."""
    values = list(getattr(param, field))
    if not values:
        return [default, default]
    if len(values) != 2:
        raise ctx.error(f"norm_conv_meanfield_param.{field} must be given 0 or 2 times (one per "
                        f"convolution: bilateral, spatial), got {len(values)}")
    return values


def check_iterations(param, ctx):
    """num_iterations of norm_conv_meanfield_param (shared with NospConvMeanfield): the original
    CHECKs num_iterations > 1, so the proto default of 1 is rejected too."""
    if param.num_iterations < 2:
        raise ctx.error(f"norm_conv_meanfield_param.num_iterations must be >= 2, got "
                        f"{param.num_iterations}")
    limits.check(param.num_iterations, "layer_iterations",
                 "norm_conv_meanfield_param.num_iterations", f"{ctx.name} ({ctx.type})")


def warn_original_defaults(param, ctx):
    """Warn about the fields whose absence gives the original's surprising defaults, or that it
    ignores (shared with NospConvMeanfield)."""
    if not len(param.dilation):
        ctx.warn("norm_conv_meanfield_param.dilation not given: the original's default is 0, "
                 "which makes every tap read the patch centre and misaligns the messages "
                 "(reproduced); give dilation explicitly")
    if not len(param.scale):
        ctx.warn("norm_conv_meanfield_param.scale not given: the original's default is 0 "
                 "(uniform attention over the taps, reproduced)")
    if any(norm != _L2 for norm in param.norm):
        ctx.warn("norm_conv_meanfield_param.norm is ignored: the original always uses L2")


def check_bottom_shapes(shapes, count_word, ctx):
    """The unary, initial Q and feature bottoms (shared with NospConvMeanfield): all 4-D, Q like
    the unary, the features with the unary's batch and spatial size."""
    if any(len(s) != 4 for s in shapes):
        raise ctx.error(f"all {count_word} bottoms must be 4-D (N, C, H, W), got {shapes}")
    unary, q0 = shapes[:2]
    if q0 != unary:
        raise ctx.error(f"bottom 1 (initial Q) must have the unary's shape {unary}, got {q0}")
    for index, shape in enumerate(shapes[2:], start=2):
        if shape[0] != unary[0] or shape[2:] != unary[2:]:
            raise ctx.error(f"bottom {index} (features) must have the unary's batch and spatial "
                            f"size {(unary[0], unary[2], unary[3])}, got {shape}")


def check_message_grid(spec, convolution, height, width, ctx):
    """Refuse a message grid the original would read past; warn when it is not the input's size
    (the original reads it as if aligned). `convolution` names it in the messages."""
    grid, fits = message_grid_fits(spec, height, width)
    where = (f"{convolution} (kernel {spec.kernel}, pad {spec.pad}, stride {spec.stride}, "
             f"dilation {spec.dilation}) gives a {grid[0]}x{grid[1]} message for a "
             f"{height}x{width} input")
    if not fits:
        raise ctx.error(f"{where}; the original would read past it. Use stride 1 and "
                        f"pad = (kernel_size // 2) * dilation")
    if grid != (height, width):
        ctx.warn(f"{where}: the original reads its first {height}x{width} values per channel "
                 f"as if aligned (reproduced); use stride 1 and pad = (kernel_size // 2) * dilation")


class MeanfieldLayer(CaffeLayer):
    """The segmentation-aware CRFs (shared with NospConvMeanfield): the top has the unary's
    shape; the blobs are (1, 1, C, C) weights = I, CAFFE_BLOBS but the last, and the
    compatibility = -I (Potts), the last."""

    def __init__(self, *, channels, num_iterations):
        super().__init__()
        self.num_iterations = num_iterations
        eye = torch.eye(channels).reshape(1, 1, channels, channels)
        for name in self.CAFFE_BLOBS[:-1]:
            setattr(self, name, nn.Parameter(eye.clone()))
        self.compatibility = nn.Parameter(-eye)     # Potts

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]


@register_layer("NormConvMeanfield")
class NormConvMeanfield(MeanfieldLayer):
    IGNORES_PROPAGATE_DOWN = (0, 1, 2, 3)   # all four bottoms get a diff
    USES_SEGAWARE_KERNELS = True
    BOTTOMS = (4, 4)
    TOPS = (1, 1)
    CAFFE_BLOBS = ("spatial_weight", "bilateral_weight", "compatibility")

    def __init__(self, *, channels, num_iterations, bilateral, spatial):
        super().__init__(channels=channels, num_iterations=num_iterations)
        self.bilateral, self.spatial = bilateral, spatial

    @classmethod
    def from_proto(cls, layer_param, ctx):
        param = layer_param.norm_conv_meanfield_param
        check_iterations(param, ctx)
        if len(param.kernel_size) != 2:
            raise ctx.error(f"norm_conv_meanfield_param.kernel_size must be given exactly twice "
                            f"(bilateral, spatial), got {len(param.kernel_size)}")
        warn_original_defaults(param, ctx)
        if any(not term for term in param.scale_term):
            ctx.warn("norm_conv_meanfield_param.scale_term is ignored: the original always scales")
        fields = dict(pad=_two_or_default(param, "pad", 0, ctx),
                      stride=_two_or_default(param, "stride", 1, ctx),
                      dilation=_two_or_default(param, "dilation", 0, ctx),
                      scale=_two_or_default(param, "scale", 0.0, ctx),
                      remove_center=_two_or_default(param, "remove_center", True, ctx),
                      remove_bounds=_two_or_default(param, "remove_bounds", True, ctx))
        specs = []
        for index, entry in enumerate(_ENTRIES):
            spec = MessageSpec(kernel=int(param.kernel_size[index]), pad=int(fields["pad"][index]),
                               stride=int(fields["stride"][index]),
                               dilation=int(fields["dilation"][index]),
                               scale=float(fields["scale"][index]),
                               remove_center=bool(fields["remove_center"][index]),
                               remove_bounds=bool(fields["remove_bounds"][index]))
            if spec.kernel < 1 or spec.stride < 1:
                raise ctx.error(f"the {entry} convolution needs kernel_size and stride >= 1, got "
                                f"kernel_size {spec.kernel}, stride {spec.stride}")
            specs.append(spec)
        shapes = [tuple(s) for s in ctx.bottom_shapes]
        cls._check_shapes(shapes, specs, ctx)
        return cls(channels=shapes[0][1], num_iterations=int(param.num_iterations),
                   bilateral=specs[0], spatial=specs[1])

    @staticmethod
    def _check_shapes(shapes, specs, ctx):
        check_bottom_shapes(shapes, "four", ctx)
        height, width = shapes[0][2:]
        for spec, entry in zip(specs, _ENTRIES):
            check_message_grid(spec, f"the {entry} convolution", height, width, ctx)

    def forward(self, unary, q0, feat_bilateral, feat_spatial):
        return normconv_meanfield(unary, q0, feat_bilateral, feat_spatial, self.spatial_weight,
                                  self.bilateral_weight, self.compatibility,
                                  num_iterations=self.num_iterations, bilateral=self.bilateral,
                                  spatial=self.spatial)

    def extra_repr(self):
        return (f"channels={self.compatibility.shape[-1]}, num_iterations={self.num_iterations}, "
                f"bilateral={self.bilateral}, spatial={self.spatial}")
