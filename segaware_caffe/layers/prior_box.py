"""PriorBox (SSD fork): the default boxes of one feature map, and their variances."""
import math

import numpy as np
import torch

from ..layer import CaffeLayer, register_layer


def prior_aspect_ratios(aspect_ratios, flip):
    """SSD's list: 1 first, then each given ratio not already present (within 1e-6), followed
    by its reciprocal when flip is set."""
    ratios = [np.float32(1.0)]
    for ratio in aspect_ratios:
        ratio = np.float32(ratio)
        if any(abs(float(ratio) - float(r)) < 1e-6 for r in ratios):
            continue
        ratios.append(ratio)
        if flip:
            ratios.append(np.float32(1.0 / float(ratio)))
    return ratios


def prior_boxes(layer_hw, image_hw, *, min_sizes, max_sizes, aspect_ratios, clip, variances,
                step_hw, offset):
    """The (1, 2, H*W*P*4) top of SSD's PriorBox as float32 numpy: row 0 the boxes
    (xmin, ymin, xmax, ymax)/image size for every cell (row-major) and prior, row 1 the variances.

    Per cell and min size: a box of min_size (SSD truncates min_size, and max_size, to int), then
    sqrt(min_size * max_size) if max sizes are given, then min_size*sqrt(r) x min_size/sqrt(r)
    for each aspect ratio r != 1. Centres are ((w + offset) * step_w, (h + offset) * step_h),
    the step being image size / feature size unless given.
    """
    height, width = layer_hw
    image_h, image_w = image_hw
    f32 = np.float32
    step_h, step_w = step_hw if step_hw is not None else (f32(image_h) / f32(height),
                                                          f32(image_w) / f32(width))
    step_h, step_w = f32(step_h), f32(step_w)
    sizes = []                      # (box width, box height) per prior, as SSD's floats
    for s, min_size in enumerate(min_sizes):
        min_int = int(min_size)     # SSD stores the min size in an int
        sizes.append((f32(min_int), f32(min_int)))
        if max_sizes:
            side = f32(math.sqrt(min_int * int(max_sizes[s])))
            sizes.append((side, side))
        for ratio in aspect_ratios:
            if abs(float(ratio) - 1.0) < 1e-6:
                continue
            root = math.sqrt(float(ratio))
            sizes.append((f32(min_int * root), f32(min_int / root)))
    box_w = np.array([w for w, _ in sizes], dtype=np.float64)
    box_h = np.array([h for _, h in sizes], dtype=np.float64)
    cx = ((np.arange(width, dtype=np.float32) + f32(offset)) * step_w).astype(np.float64)
    cy = ((np.arange(height, dtype=np.float32) + f32(offset)) * step_h).astype(np.float64)
    cx = cx[None, :, None]          # (1, W, 1)
    cy = cy[:, None, None]          # (H, 1, 1)
    shape = (height, width, len(sizes))
    boxes = np.stack([np.broadcast_to((cx - box_w / 2.0) / image_w, shape),
                      np.broadcast_to((cy - box_h / 2.0) / image_h, shape),
                      np.broadcast_to((cx + box_w / 2.0) / image_w, shape),
                      np.broadcast_to((cy + box_h / 2.0) / image_h, shape)], axis=-1)
    boxes = boxes.astype(np.float32).reshape(-1)
    if clip:
        boxes = np.clip(boxes, 0, 1)
    variance = np.resize(np.asarray(variances, dtype=np.float32), boxes.size)  # 1 or 4 values
    return np.stack([boxes, variance])[None]


@register_layer("PriorBox")
class PriorBox(CaffeLayer):
    """Top (1, 2, H*W*P*4) from the feature map's (bottom 0) and the image's (bottom 1) sizes;
    the values never depend on the bottoms' data, so nothing flows back (SSD's backward is
    empty). P = len(min_size) * len(aspect ratios incl. 1 and flips) + len(max_size)."""
    BOTTOMS = (2, 2)
    HAS_BACKWARD = False

    def __init__(self, *, min_sizes, max_sizes=(), aspect_ratios=(1.0,), clip=False,
                 variances=(0.1,), image_hw=None, step_hw=None, offset=0.5):
        super().__init__()
        self.min_sizes, self.max_sizes = tuple(min_sizes), tuple(max_sizes)
        self.aspect_ratios, self.clip = tuple(aspect_ratios), clip
        self.variances, self.image_hw = tuple(variances), image_hw
        self.step_hw, self.offset = step_hw, offset

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.prior_box_param
        if not len(p.min_size):
            raise ctx.error("prior_box_param.min_size is required (one or more)")
        if any(s <= 0 for s in p.min_size):
            raise ctx.error(f"prior_box_param.min_size must be > 0, got {list(p.min_size)}")
        if len(p.max_size) and len(p.max_size) != len(p.min_size):
            raise ctx.error(f"prior_box_param has {len(p.max_size)} max_size for "
                            f"{len(p.min_size)} min_size; give one per min_size or none")
        for low, high in zip(p.min_size, p.max_size):
            if not high > low:
                raise ctx.error(f"prior_box_param.max_size {high:g} must be greater than its "
                                f"min_size {low:g}")
        if len(p.variance) not in (0, 1, 4):
            raise ctx.error(f"prior_box_param.variance takes 1 or 4 values, got {len(p.variance)}")
        if any(v <= 0 for v in p.variance):
            raise ctx.error(f"prior_box_param.variance must be > 0, got {list(p.variance)}")
        image_hw = None
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise ctx.error("prior_box_param: give either img_size or img_h/img_w, not both")
            if p.img_h <= 0 or p.img_w <= 0:
                raise ctx.error(f"prior_box_param.img_h and img_w must both be > 0, got "
                                f"{p.img_h} and {p.img_w}")
            image_hw = (int(p.img_h), int(p.img_w))
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise ctx.error("prior_box_param.img_size must be > 0")
            image_hw = (int(p.img_size), int(p.img_size))
        step_hw = None
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise ctx.error("prior_box_param: give either step or step_h/step_w, not both")
            if not (p.step_h > 0 and p.step_w > 0):
                raise ctx.error(f"prior_box_param.step_h and step_w must both be > 0, got "
                                f"{p.step_h:g} and {p.step_w:g}")
            step_hw = (float(p.step_h), float(p.step_w))
        elif p.HasField("step"):
            if not p.step > 0:
                raise ctx.error(f"prior_box_param.step must be > 0, got {p.step:g}")
            step_hw = (float(p.step), float(p.step))
        for name, shape in zip(ctx.bottom_names, ctx.bottom_shapes):
            if len(shape) != 4:
                raise ctx.error(f"bottom {name!r} must be 4-D (N, C, H, W), got shape {shape}")
        layer = cls(min_sizes=[float(s) for s in p.min_size],
                    max_sizes=[float(s) for s in p.max_size],
                    aspect_ratios=[float(r) for r in prior_aspect_ratios(p.aspect_ratio, p.flip)],
                    clip=bool(p.clip), variances=[float(v) for v in p.variance] or [0.1],
                    image_hw=image_hw, step_hw=step_hw, offset=float(p.offset))
        return layer

    @property
    def num_priors(self):
        return len(self.min_sizes) * len(self.aspect_ratios) + len(self.max_sizes)

    def output_shapes(self, bottom_shapes):
        height, width = bottom_shapes[0][2:]
        return [(1, 2, height * width * self.num_priors * 4)]

    def forward(self, feature, image):
        image_hw = self.image_hw or tuple(image.shape[2:])
        top = prior_boxes(tuple(feature.shape[2:]), image_hw, min_sizes=self.min_sizes,
                          max_sizes=self.max_sizes, aspect_ratios=self.aspect_ratios,
                          clip=self.clip, variances=self.variances, step_hw=self.step_hw,
                          offset=self.offset)
        return torch.from_numpy(np.ascontiguousarray(top)).to(device=feature.device,
                                                             dtype=feature.dtype)

    def extra_repr(self):
        return (f"min_sizes={self.min_sizes}, max_sizes={self.max_sizes}, "
                f"aspect_ratios={tuple(round(r, 4) for r in self.aspect_ratios)}, "
                f"clip={self.clip}, variances={self.variances}, step={self.step_hw}, "
                f"offset={self.offset}")
