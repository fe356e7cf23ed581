"""DistLoss: the segaware embedding hinge loss over Im2dist / Im2parity outputs."""
from segaware_caffe.kernels.dist_loss import dist_loss

from ..layer import CaffeLayer, register_layer
from ..params import conv_geometry


@register_layer("DistLoss")
class DistLoss(CaffeLayer):
    """loss = sum(m) / count(D) with m = max(D - alpha, 0) where the parity is non-zero (same
    label), max(beta - D, 0) where it is 0, and 0 where it equals ignore_label. The gradient to
    D is the original's signed m / count, unscaled by loss_weight; the parity gets none."""
    USES_SEGAWARE_KERNELS = True
    IGNORES_PROPAGATE_DOWN = (0,)   # the distance always gets its diff, the parity never
    BOTTOMS = (2, 2)
    IS_LOSS = True
    # the original's backward writes only the distances' diff
    NO_GRAD_BOTTOMS = (1,)

    def __init__(self, *, alpha, beta, ignore_label=None):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.ignore_label = ignore_label

    @classmethod
    def from_proto(cls, layer_param, ctx):
        # the original parses the convolution geometry (and aborts without a kernel size),
        # although nothing uses it
        if not layer_param.HasField("convolution_param"):
            raise ctx.error("convolution_param with kernel_size is required (the original "
                            "aborts without it), got no convolution_param")
        conv_geometry(layer_param.convolution_param, ctx)
        dp = layer_param.dist_loss_param
        missing = [f for f in ("alpha", "beta") if not dp.HasField(f)]
        if missing:
            raise ctx.error(f"dist_loss_param.{' and '.join(missing)} required, got none")
        alpha, beta = float(dp.alpha), float(dp.beta)
        if not (alpha > 0 and beta > 0 and beta > alpha):
            raise ctx.error(f"dist_loss_param needs beta > alpha > 0, got alpha {alpha:g}, "
                            f"beta {beta:g}")
        if len(ctx.bottom_shapes) == 2:
            dist_shape, parity_shape = (tuple(s) for s in ctx.bottom_shapes)
            count = lambda shape: 1 if not shape else shape[0] * count(shape[1:])
            if not dist_shape or not parity_shape or dist_shape[0] != parity_shape[0]:
                raise ctx.error(f"bottoms must have the same num (first dimension), got "
                                f"{dist_shape} and {parity_shape}")
            if count(dist_shape) != count(parity_shape):
                raise ctx.error(f"the parity bottom must have as many elements as the distance "
                                f"bottom {dist_shape}, got {parity_shape}")
        return cls(alpha=alpha, beta=beta,
                   ignore_label=dp.ignore_label if dp.HasField("ignore_label") else None)

    def forward(self, dist, parity):
        return dist_loss(dist, parity, self.alpha, self.beta, ignore_label=self.ignore_label)

    def extra_repr(self):
        extra = f", ignore_label={self.ignore_label}" if self.ignore_label is not None else ""
        return f"alpha={self.alpha:g}, beta={self.beta:g}{extra}"
