"""Augmentation (FlowNet): joint geometric augmentation of an image pair and its flow field."""
import numpy as np
import torch

from ..layer import CaffeLayer, register_layer


def translation_shift(t, width):
    """The original's shift in pixels for a translation draw t: int(t * W) in float32, truncated
    toward zero."""
    return int(np.float32(t) * np.float32(width))


@register_layer("Augmentation")
class Augmentation(CaffeLayer):
    """Bottoms img0, img1 (N, 3, H, W) and flow (N, 2, H, W); tops img0', img1', flow' and mask
    (N, 1, H, W). Parameters in aug_param (LayerParameter field 3002).

    The original applies transformations 1..num_transformations in turn to each item:
    1. translation by s = int(t * W) pixels along both axes (the width is used for the vertical
       shift too), t uniform in [min_translation, max_translation], drawn per item: s > 0 moves
       the content up and left (out[y, x] = in[y + s, x + s]), s < 0 down and right, uncovered
       pixels are 0; the flow moves the same way and is rescaled, u by W / (W - |s|) and v by
       H / (H - |s|), its uncovered pixels being u = 1, v = 0 before that scaling (OpenCV's
       scalar border value fills the first channel only); mask = 1 on uncovered pixels, else 0.
    2. rotation and 3. scaling: their code is commented out in the original; they change
       nothing.
    4. gaussian noise (and 5-8 after it) draw noise from the original's unseeded generators, which
       cannot be reproduced: num_transformations >= 4 is refused when the net is built.
    num_transformations <= 0 writes none of the tops, which stay 0 as Caffe allocates them.
    The draw of t uses a torch generator seeded from torch's global generator when the net is
    built (the original used the C library's rand()); min = max makes it deterministic.
    Backward is empty in the original: no gradient flows through this layer."""
    BOTTOMS = (3, 3)
    TOPS = (4, 4)
    HAS_BACKWARD = False

    def __init__(self, *, num_transformations, min_translation, max_translation, seed=0):
        super().__init__()
        self.num_transformations = int(num_transformations)
        self.min_translation = float(np.float32(min_translation))
        self.max_translation = float(np.float32(max_translation))
        self.seed = int(seed)
        self._generator = None

    @classmethod
    def from_proto(cls, layer_param, ctx):
        aug = layer_param.aug_param
        num = int(aug.num_transformations)
        if num >= 4:
            raise ctx.error(
                f"aug_param.num_transformations {num} includes transformation 4 (gaussian noise, "
                f"aug_param.min_gaussian/max_gaussian), whose noise the original draws from "
                f"generators that cannot be seeded or reproduced (and 5-8 come after it); "
                f"only num_transformations <= 3 (translation; rotation and scaling are no-ops in "
                f"the original) is supported")
        img0, img1, flow = (tuple(s) for s in ctx.bottom_shapes)
        if len(img0) != 4 or img0[1] != 3:
            raise ctx.error(f"bottom 0 ({ctx.bottom_names[0]!r}) must be an (N, 3, H, W) image "
                            f"batch, got {img0}")
        if img1 != img0:
            raise ctx.error(f"bottom 1 ({ctx.bottom_names[1]!r}) must have the shape of bottom 0 "
                            f"{img0}, got {img1}")
        if len(flow) != 4 or flow[1] != 2 or (flow[0], flow[2], flow[3]) != (img0[0],) + img0[2:]:
            raise ctx.error(f"bottom 2 ({ctx.bottom_names[2]!r}) must be a flow field "
                            f"({img0[0]}, 2, {img0[2]}, {img0[3]}), got {flow}")
        height, width = img0[2:]
        if num >= 1:
            bounds = (aug.min_translation, aug.max_translation)
            if not all(np.isfinite(np.float32(t)) for t in bounds):
                raise ctx.error(f"aug_param min_translation and max_translation must be finite "
                                f"numbers, got [{bounds[0]}, {bounds[1]}]")
            largest = max(abs(translation_shift(t, width))
                          for t in (aug.min_translation, aug.max_translation))
            if largest >= min(height, width):
                raise ctx.error(
                    f"aug_param translation range [{aug.min_translation}, {aug.max_translation}] "
                    f"allows a shift of {largest} pixels (int(t * width), width {width}), which "
                    f"leaves nothing of a {height}x{width} image; the shift must stay below "
                    f"{min(height, width)}")
        if num <= 0:
            ctx.warn(f"aug_param.num_transformations {num}: the original writes none of the tops, "
                     f"which stay 0")
        elif num >= 2:
            ctx.warn("aug_param: transformations 2 (rotation) and 3 (scaling) do nothing in the "
                     "original (their code is commented out); only the translation is applied")
        return cls(num_transformations=num, min_translation=aug.min_translation,
                   max_translation=aug.max_translation,
                   seed=int(torch.randint(2 ** 62, (1,)).item()))

    def output_shapes(self, bottom_shapes):
        # not by a trial forward: that would consume a draw of the random stream
        img0, img1, flow = (tuple(s) for s in bottom_shapes)
        return [img0, img1, flow, (flow[0], flow[1] // 2) + flow[2:]]

    def draw_shifts(self, count, width):
        """Per-item shifts int(t * W), t = min + u * (max - min) in float32."""
        low, high = np.float32(self.min_translation), np.float32(self.max_translation)
        if low == high:
            return [translation_shift(low, width)] * count
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        u = torch.rand(count, generator=self._generator, dtype=torch.float32).numpy()
        t = (low + u * (high - low)).astype(np.float32)
        return [translation_shift(v, width) for v in t]

    @torch.no_grad()        # the original has no backward: keep no graph
    def forward(self, img0, img1, flow):
        n, _, height, width = img0.shape
        if self.num_transformations <= 0:
            return (torch.zeros_like(img0), torch.zeros_like(img1), torch.zeros_like(flow),
                    flow.new_zeros((n, flow.shape[1] // 2, height, width)))
        shift = torch.tensor(self.draw_shifts(n, width), device=img0.device).view(n, 1, 1)
        rows = torch.arange(height, device=img0.device).view(1, height, 1) + shift
        cols = torch.arange(width, device=img0.device).view(1, 1, width) + shift
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)     # (N, H, W)
        source = rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)

        def move(x):
            flat = x.flatten(2)
            index = source.flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1)
            moved = torch.gather(flat, 2, index).view_as(x)
            return torch.where(inside.unsqueeze(1), moved, torch.zeros((), dtype=x.dtype,
                                                                       device=x.device))

        moved = move(flow)
        one = torch.ones((), dtype=flow.dtype, device=flow.device)
        u = torch.where(inside, moved[:, 0], one)
        v = moved[:, 1]
        magnitude = shift.abs().to(flow.dtype)
        # factors w / (w - |s|), h / (h - |s|), one division in the bottoms' precision as the
        # original's floats (a Python number divided by a tensor would be a reciprocal times it)
        w, h = (torch.full_like(magnitude, float(size)) for size in (width, height))
        u = u * (w / (w - magnitude))
        v = v * (h / (h - magnitude))
        # the original subtracts the zero-filled from the one-filled u: 0 inside (NaN for NaN or
        # infinite flow), 1 on the uncovered pixels
        mask = torch.where(inside, moved[:, 0] - moved[:, 0], one).unsqueeze(1)
        return move(img0), move(img1), torch.stack((u, v), dim=1), mask

    def extra_repr(self):
        return (f"num_transformations={self.num_transformations}, translation=["
                f"{self.min_translation}, {self.max_translation}]")
