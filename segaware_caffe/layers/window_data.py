"""WindowData (R-CNN): foreground and background windows of images, warped to a fixed size."""
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..data.images import DataError, DataSetupError, read_image
from ..data.listfile import resolve_file, resolve_item
from ..data.stream import StreamDataLayer, draw_seed
from ..data.windows import WindowCrop, WindowFileError, parse_window_file
from .. import limits
from ..layer import register_layer
from .data import load_mean_file, read_mean_file

CROP_MODES = ("warp", "square")


def _randint(generator, high):
    return int(torch.randint(high, (1,), generator=generator).item())


def foreground_count(batch_size, fg_fraction):
    """int(batch_size * fg_fraction) in float32, as the original counts it."""
    return int(np.float32(batch_size) * np.float32(fg_fraction))


@dataclass(frozen=True)
class WindowSampler:
    """Batches of Caffe's WindowData: batch - num_fg background windows, then num_fg foreground
    ones, each drawn uniformly (with replacement) from its class, mirrored with probability 1/2
    when mirror is set."""
    source: str
    images: tuple
    background: tuple
    foreground: tuple
    num_background: int
    num_foreground: int
    mirror: bool
    crop: WindowCrop
    label: str

    def __call__(self, generator):
        cache = {}     # the last few decoded images (windows of one image often follow each other)
        while True:
            for windows, count in ((self.background, self.num_background),
                                   (self.foreground, self.num_foreground)):
                for _ in range(count):
                    window = windows[_randint(generator, len(windows))]
                    mirror = self.mirror and _randint(generator, 2) == 1
                    path = self.images[window.image]
                    where = (f"{self.label}: window file {self.source}, line {window.line} "
                             f"(image {path})")
                    image = cache.get(path)
                    if image is None:
                        try:
                            image = read_image(path, color=True)
                        except OSError as e:
                            raise DataError(f"{where}: cannot read the image: {e}") from None
                        if len(cache) >= 8:
                            cache.pop(next(iter(cache)))
                        cache[path] = image
                    yield self.crop(image, window, mirror, where), np.array(window.label, np.float32)


@register_layer("WindowData")
class WindowData(StreamDataLayer):
    """window_data_param { source batch_size fg_threshold (0.5) bg_threshold (0.5) fg_fraction
    (0.25) context_pad (0) crop_mode ("warp" | "square") scale (1) root_folder } and
    transform_param { crop_size (required) mean_value | mean_file mirror }. Tops: data
    (batch, 3, crop, crop), the images read as 3-channel BGR, and label (batch,): 0 for the
    background items. Windows with overlap >= fg_threshold are foreground, < bg_threshold
    background (label 0), others unused. Each batch holds batch - int(batch * fg_fraction)
    background items, then the foreground ones. The window draw and the mirror flip come from a
    torch generator seeded from torch's global generator when the net is built (the original
    used its own mt19937), so `torch.manual_seed` before building makes the batches reproducible.
    The crop is resized with OpenCV's 8-bit bilinear arithmetic, bit for bit. cache_images only
    changed the original's speed and is ignored; transform_param.scale is not used (the original
    takes window_data_param.scale)."""
    TOPS = (2, 2)

    def __init__(self, *, source, root_folder="", batch_size, crop_size, context_pad=0,
                 crop_mode="warp", fg_threshold=0.5, bg_threshold=0.5, fg_fraction=0.25,
                 scale=1.0, mean_values=(), mean_file=None, mirror=False, base_dir=".", seed=0,
                 label="WindowData", num_workers=None):
        super().__init__()
        windows = parse_window_file(source, root_folder, fg_threshold, bg_threshold)
        self.source, self.indices_in_order = source, windows.indices_in_order
        self.channels = windows.channels
        num_fg = foreground_count(batch_size, fg_fraction)
        if num_fg > 0 and not windows.foreground:
            raise WindowFileError(f"window file {source} has no foreground window (overlap >= "
                                  f"fg_threshold {fg_threshold}), but a batch takes {num_fg}")
        if batch_size - num_fg > 0 and not windows.background:
            raise WindowFileError(f"window file {source} has no background window (overlap < "
                                  f"bg_threshold {bg_threshold}), but a batch takes "
                                  f"{batch_size - num_fg}")
        means = tuple(float(v) for v in mean_values)
        if len(means) == 1:
            means = means * 3
        crop = WindowCrop(crop_size=int(crop_size), context_pad=int(context_pad),
                          square=crop_mode == "square", scale=float(scale), mean_values=means,
                          mean_image=load_mean_file(mean_file) if mean_file else None)
        images = tuple(os.path.abspath(resolve_item(p, base_dir)) for p in windows.images)
        sampler = WindowSampler(source=source, images=images, background=windows.background,
                                foreground=windows.foreground,
                                num_background=batch_size - num_fg, num_foreground=num_fg,
                                mirror=bool(mirror), crop=crop, label=label)
        self.counts = (len(windows.foreground), len(windows.background))
        self._setup_stream(produce=sampler, seed=seed, batch_size=batch_size,
                           top_shapes=[(batch_size, 3, crop_size, crop_size), (batch_size,)],
                           label=label, num_workers=num_workers)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        param, tp = layer_param.window_data_param, layer_param.transform_param
        if param.batch_size <= 0:
            raise ctx.error(f"window_data_param.batch_size must be > 0, got {param.batch_size}")
        limits.check(param.batch_size, "batch_size", "window_data_param.batch_size",
                     f"{ctx.name} ({ctx.type})")
        crop = int(tp.crop_size)
        if crop <= 0:
            raise ctx.error("transform_param.crop_size must be > 0 (the size windows are warped to)")
        if not 0 <= param.fg_fraction <= 1:
            raise ctx.error(f"window_data_param.fg_fraction must be in [0, 1], got "
                            f"{param.fg_fraction}")
        if 2 * param.context_pad >= crop:
            raise ctx.error(f"window_data_param.context_pad {param.context_pad} leaves nothing "
                            f"of crop_size {crop}; it must be < crop_size / 2")
        crop_mode = param.crop_mode
        if crop_mode not in CROP_MODES:
            ctx.warn(f"window_data_param.crop_mode {crop_mode!r} is neither 'warp' nor 'square'; "
                     f"the original treats it as 'warp'")
            crop_mode = "warp"
        for field in ("scale", "crop_height", "crop_width"):
            if tp.HasField(field):
                ctx.warn(f"transform_param.{field} is not used by WindowData (as in Caffe; the "
                         f"scale is window_data_param.scale)")
        for field in ("mean_file", "crop_size", "mirror"):
            if param.HasField(field):
                ctx.warn(f"window_data_param.{field} is ignored (as in Caffe); give it in "
                         f"transform_param")
        if tp.HasField("mean_file") and len(tp.mean_value):
            raise ctx.error("transform_param: give either mean_file or mean_value, not both")
        if len(tp.mean_value) not in (0, 1, 3):
            raise ctx.error(f"transform_param has {len(tp.mean_value)} mean_value entries; give 1 "
                            f"or 3 (B, G, R)")
        mean_file, mean = read_mean_file(tp, ctx)
        if mean is not None:
            offset = (mean.shape[-1] - crop) // 2 if mean.ndim == 3 else 0
            if mean.ndim != 3 or mean.shape[0] != 3 or mean.shape[2] < crop \
                    or mean.shape[1] < offset + crop:
                raise ctx.error(f"mean_file {mean_file} holds a blob of shape {mean.shape}; "
                                f"WindowData needs 3 x H x W with W >= crop_size {crop} and "
                                f"H >= (W - crop_size) / 2 + crop_size")
        source = os.path.abspath(resolve_file(param.source, ctx, "window_data_param.source"))
        label = f"{ctx.name} ({ctx.type})"
        try:
            layer = cls(source=source, root_folder=param.root_folder,
                        batch_size=int(param.batch_size), crop_size=crop,
                        context_pad=int(param.context_pad), crop_mode=crop_mode,
                        fg_threshold=float(param.fg_threshold),
                        bg_threshold=float(param.bg_threshold),
                        fg_fraction=float(param.fg_fraction), scale=float(param.scale),
                        mean_values=tuple(float(v) for v in tp.mean_value), mean_file=mean_file,
                        mirror=bool(tp.mirror), base_dir=ctx.base_dir, seed=draw_seed(),
                        label=label)
        except WindowFileError as e:
            raise DataSetupError(ctx.name, ctx.type, str(e)) from None
        if layer.channels != 3:
            raise ctx.error(f"window file {source}: the last image block gives {layer.channels} "
                            f"channels, which sizes the data top, but the images are read as "
                            f"3-channel colour (the original would overrun its buffer)")
        if not layer.indices_in_order:
            ctx.warn(f"window file {source}: the image indices after '#' are not 0, 1, 2, ...; "
                     f"as in Caffe, a window of block '# k' reads the k-th image of the file "
                     f"(0-based)")
        return layer

    def extra_repr(self):
        return (f"source={self.source!r}, batch_size={self.batch_size}, windows: "
                f"{self.counts[0]} foreground, {self.counts[1]} background")
