"""BatchNorm as modified by the fork. Where the fork's CPU and GPU code differ this follows the
GPU path, the one the released models were trained and evaluated with."""
import torch

from ..layer import CaffeLayer, register_layer


@register_layer("BatchNorm")
class BatchNorm(CaffeLayer):
    """Per-channel (axis 1) normalisation y = (x - mean) / sqrt(var + eps).

    Blobs [mean*s, var*s, s] (shapes (C), (C), (1)), zero-filled; the statistics are
    blob/s, or 0 when s == 0 (an unloaded layer then gives x / sqrt(eps)).

    - use_global_stats (default: true in TEST, false in TRAIN): the stored statistics. With
      update_global_stats in TRAIN, var is instead the batch mean of (x - stored mean)^2 and the
      blobs become s*f + 1, mean + f*blob0, m/(m-1)*var + f*blob1 (f = moving_average_fraction,
      m = elements per channel).
    - otherwise: the batch mean, and as divisor the original's persistent per-channel buffer,
      which starts at 0 and becomes sqrt(previous + eps) at every forward (the batch variance is
      never computed).

    Backward: dx = dy / divisor, statistics treated as constants; the blobs get no gradient.
    """
    CAFFE_BLOBS = ("mean_sum", "variance_sum", "scale_factor")

    def __init__(self, *, channels, use_global_stats=True, update_global_stats=False,
                 moving_average_fraction=0.999, eps=1e-5):
        super().__init__()
        self.use_global_stats = use_global_stats
        self.update_global_stats = update_global_stats
        self.moving_average_fraction = moving_average_fraction
        self.eps = eps
        self.mean_sum = self.new_parameter((channels,), "mean")
        self.variance_sum = self.new_parameter((channels,), "variance")
        self.scale_factor = self.new_parameter((1,), "scale factor")
        # The original's variance_ member in batch mode; per layer instance, not saved in weights.
        self.register_buffer("batch_divisor", self.new_tensor((channels,), "batch divisor"),
                             persistent=False)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        bp = layer_param.batch_norm_param
        if not 0 <= bp.moving_average_fraction <= 1:
            raise ctx.error("batch_norm_param.moving_average_fraction must be in [0, 1], got "
                            f"{bp.moving_average_fraction}")
        shape = tuple(ctx.bottom_shapes[0])
        if len(shape) == 0:
            raise ctx.error("the bottom must have at least 1 axis, got a 0-axis blob")
        use_global_stats = (bp.use_global_stats if bp.HasField("use_global_stats")
                            else ctx.phase == "TEST")
        return cls(channels=shape[1] if len(shape) > 1 else 1, use_global_stats=use_global_stats,
                   update_global_stats=bp.update_global_stats and ctx.phase == "TRAIN",
                   moving_average_fraction=bp.moving_average_fraction, eps=bp.eps)

    def output_shapes(self, bottom_shapes):
        # forward updates state, so shapes are not inferred by running it
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        reduce_dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 1 else [0]
        stat_shape = [1] * x.dim()
        if x.dim() > 1:
            stat_shape[1] = x.shape[1]
        with torch.no_grad():
            if self.use_global_stats:
                stored = self.scale_factor[0]
                factor = torch.where(stored == 0, torch.zeros_like(stored), 1 / stored)
                mean = self.mean_sum * factor
                var = self.variance_sum * factor
                if self.update_global_stats:
                    var = (x - mean.reshape(stat_shape)).square().mean(reduce_dims)
                    self._update_stored(mean, var, x.numel() // mean.numel())
                divisor = torch.sqrt(var + self.eps)
            else:
                mean = x.mean(reduce_dims)
                self.batch_divisor.copy_(torch.sqrt(self.batch_divisor + self.eps))
                divisor = self.batch_divisor.clone()
        # mean and divisor carry no graph, so autograd gives exactly dx = dy / divisor.
        return (x - mean.reshape(stat_shape)) / divisor.reshape(stat_shape)

    def _update_stored(self, mean, var, per_channel):
        fraction = self.moving_average_fraction
        correction = per_channel / (per_channel - 1) if per_channel > 1 else 1.0
        self.scale_factor.mul_(fraction).add_(1)
        self.mean_sum.mul_(fraction).add_(mean)
        self.variance_sum.mul_(fraction).add_(correction * var)

    def extra_repr(self):
        parts = [f"channels={self.mean_sum.numel()}", f"use_global_stats={self.use_global_stats}"]
        if self.update_global_stats:
            parts.append("update_global_stats=True")
        if abs(self.eps - 1e-5) > 1e-12:  # the proto default is float32 1e-5
            parts.append(f"eps={self.eps}")
        return ", ".join(parts)
