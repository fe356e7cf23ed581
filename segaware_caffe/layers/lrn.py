"""LRN: local response normalisation across or within channels."""
import torch.nn.functional as F

from ..layer import CaffeLayer, register_layer
from ..params import four_axis_bottom

ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1


# Plain torch only (F): `export --python` writes this function's source into exported modules.
def caffe_lrn(x, local_size, alpha, beta, k, across_channels, sliced_window=32):
    """Caffe's LRN. Across channels: x * (k + alpha/size * sum of x^2 over `size` neighbouring
    channels, zero-padded)^-beta; within a channel: x * (1 + alpha * mean of x^2 over a size x
    size window, zero-padded)^-beta."""
    half = (local_size - 1) // 2
    squares = x * x
    # the zero padding is written out: torch's pooling refuses an input smaller than its kernel
    # even where the padding makes up the difference (fewer channels than local_size)
    if across_channels:
        padded = F.pad(squares, (0, 0, 0, 0, half, half))
        if local_size <= sliced_window:
            # the window's channels summed as shifted slices, in the order a (size, 1, 1)
            # average pool sums them (same values), several times faster on CPU
            channels = squares.shape[1]
            total = padded[:, :channels].clone()
            for shift in range(1, local_size):
                total += padded[:, shift:shift + channels]
            window_mean = total / local_size
        else:
            window_mean = F.avg_pool3d(padded.unsqueeze(1), (local_size, 1, 1),
                                       stride=1).squeeze(1)
        scale = k + alpha * window_mean
    else:
        window_mean = F.avg_pool2d(F.pad(squares, (half, half, half, half)), local_size, stride=1)
        scale = 1.0 + alpha * window_mean
    return x * scale.pow(-beta)


@register_layer("LRN")
class LRN(CaffeLayer):
    """ACROSS_CHANNELS: y = x * (k + alpha/size * sum of x^2 over `size` neighbouring channels,
    zero-padded)^-beta. WITHIN_CHANNEL: y = x * (1 + alpha * mean of x^2 over a size x size
    window, zero-padded, divisor size^2)^-beta (k unused). Backward is the true derivative."""
    SAME_SHAPE = True

    def __init__(self, *, local_size=5, alpha=1.0, beta=0.75, k=1.0, region="ACROSS_CHANNELS"):
        super().__init__()
        if local_size % 2 != 1:
            raise ValueError(f"local_size must be odd, got {local_size}")
        if region not in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
            raise ValueError(f"region must be ACROSS_CHANNELS or WITHIN_CHANNEL, got {region!r}")
        self.local_size = local_size
        self.alpha = alpha
        self.beta = beta
        self.k = k
        self.region = region

    @classmethod
    def from_proto(cls, layer_param, ctx):
        lp = layer_param.lrn_param
        if lp.local_size % 2 != 1:
            raise ctx.error(f"lrn_param.local_size must be odd, got {lp.local_size}")
        four_axis_bottom(ctx)
        region = "WITHIN_CHANNEL" if lp.norm_region == WITHIN_CHANNEL else "ACROSS_CHANNELS"
        return cls(local_size=lp.local_size, alpha=lp.alpha, beta=lp.beta, k=lp.k, region=region)

    def forward(self, x):
        return caffe_lrn(x, self.local_size, self.alpha, self.beta, self.k,
                         self.region == "ACROSS_CHANNELS")

    def extra_repr(self):
        text = f"local_size={self.local_size}, alpha={self.alpha}, beta={self.beta}"
        if self.region == "ACROSS_CHANNELS":
            return text + f", k={self.k}"
        return text + ", region=WITHIN_CHANNEL"
