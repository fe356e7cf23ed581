"""NospConvMeanfield: the segmentation-aware CRF with the bilateral message only (registered by
the fork, used by none of its configs), as the original's CPU forward computes it.

Bottoms (3): unary U, initial X0 (both (N, C, H, W), log domain), features F (N, E, H, W).
Top: X_T, not normalised. Blobs, Caffe order: bilateral weight W_b (1, 1, C, C) = I, and the
compatibility K (1, 1, C, C) = -I.

    X_{t+1} = U - K · (K · B(softmax(X_t)))       t = 0..T-1

where B is the NormConv message of entry 0 of norm_conv_meanfield_param (attention =
softmax over the taps of -scale * im2dist_L2(F)). The intended formula, which the original's GPU
forward computes, is U - K · (W_b · B); its CPU forward multiplies by the compatibility twice and
never reads W_b, and the goldens record that CPU forward, so this layer reproduces it (W_b is
still loaded and saved with the weights). Forward only: the original's backward indexes a blob
that does not exist.
"""
import torch

from segaware_caffe.kernels.meanfield import MessageSpec, message, message_attention

from ..layer import register_layer
from .norm_conv_meanfield import (MeanfieldLayer, check_bottom_shapes, check_iterations,
                                  check_message_grid, warn_original_defaults)


def _one_or_default(param, field, default, ctx):
    """The single value of a repeated field, or its default when absent."""
    values = list(getattr(param, field))
    if not values:
        return default
    if len(values) != 1:
        raise ctx.error(f"norm_conv_meanfield_param.{field} must be given 0 or 1 times (one "
                        f"convolution), got {len(values)}")
    return values[0]


@register_layer("NospConvMeanfield")
class NospConvMeanfield(MeanfieldLayer):
    BOTTOMS = (3, 3)
    CAFFE_BLOBS = ("bilateral_weight", "compatibility")
    HAS_BACKWARD = False
    USES_SEGAWARE_KERNELS = True

    def __init__(self, *, channels, num_iterations, bilateral):
        super().__init__(channels=channels, num_iterations=num_iterations)
        self.bilateral = bilateral

    @classmethod
    def from_proto(cls, layer_param, ctx):
        param = layer_param.norm_conv_meanfield_param
        check_iterations(param, ctx)
        if not len(param.kernel_size):
            raise ctx.error("norm_conv_meanfield_param.kernel_size is required (the bilateral "
                            "convolution's square kernel)")
        if len(param.kernel_size) > 1:
            ctx.warn(f"norm_conv_meanfield_param.kernel_size is given {len(param.kernel_size)} times: "
                     f"this layer has one convolution and uses only the first")
        warn_original_defaults(param, ctx)
        spec = MessageSpec(kernel=int(param.kernel_size[0]),
                           pad=int(_one_or_default(param, "pad", 0, ctx)),
                           stride=int(_one_or_default(param, "stride", 1, ctx)),
                           dilation=int(_one_or_default(param, "dilation", 0, ctx)),
                           scale=float(_one_or_default(param, "scale", 0.0, ctx)),
                           remove_center=bool(_one_or_default(param, "remove_center", True, ctx)),
                           remove_bounds=bool(_one_or_default(param, "remove_bounds", True, ctx)))
        if spec.kernel < 1 or spec.stride < 1 or spec.pad < 0 or spec.dilation < 0:
            raise ctx.error(f"the convolution needs kernel_size >= 1, stride >= 1, pad >= 0 and "
                            f"dilation >= 0, got kernel_size {spec.kernel}, stride {spec.stride}, "
                            f"pad {spec.pad}, dilation {spec.dilation}")
        shapes = [tuple(s) for s in ctx.bottom_shapes]
        check_bottom_shapes(shapes, "three", ctx)
        unary = shapes[0]
        check_message_grid(spec, "the convolution", unary[2], unary[3], ctx)
        return cls(channels=unary[1], num_iterations=int(param.num_iterations), bilateral=spec)

    @torch.no_grad()        # the original has no backward: keep no graph
    def forward(self, unary, q0, features):
        n, channels, height, width = unary.shape
        compat = self.compatibility.reshape(channels, channels)
        attention = message_attention(features, self.bilateral)
        x = q0
        for _ in range(self.num_iterations):
            msg = message(torch.softmax(x, dim=1), attention, self.bilateral)
            # the C x C products read the first C*H*W values of each image's message buffer
            msg = msg.reshape(n, -1)[:, :channels * height * width].reshape(n, channels, -1)
            x = unary - torch.matmul(compat, torch.matmul(compat, msg)).reshape(unary.shape)
        return x

    def extra_repr(self):
        return (f"channels={self.compatibility.shape[-1]}, num_iterations={self.num_iterations}, "
                f"bilateral={self.bilateral}")
