"""The common part of the list-driven image data layers (ImageSegData, TwoImageData, ImageData):
reading image_data_param / transform_param, and a CaffeLayer whose forward() returns the next
batch from a persistent DataLoader."""
import os
from dataclasses import dataclass

import torch

from .. import limits
from .images import DataError, data_setup_error, is_palette_image
from .listfile import resolve_file, saturate_uint8
from .loader import BatchLayer, EndlessSampler, ListDataset, StackBatch, default_num_workers


@dataclass(frozen=True)
class ListSettings:
    """image_data_param fields shared by the list-driven layers (Caffe defaults applied)."""
    source: str            # resolved path of the list file
    root_folder: str
    batch_size: int
    shuffle: bool
    rand_skip: int
    new_size: tuple        # (new_height, new_width) or ()
    is_color: bool
    ignore_label: int


def read_list_settings(layer_param, ctx):
    param = layer_param.image_data_param
    source = resolve_file(param.source, ctx, "image_data_param.source")
    if param.batch_size <= 0:
        raise ctx.error(f"image_data_param.batch_size must be > 0, got {param.batch_size}")
    limits.check(param.batch_size, "batch_size", "image_data_param.batch_size",
                 f"{ctx.name} ({ctx.type})")
    new_height, new_width = int(param.new_height), int(param.new_width)
    if (new_height > 0) != (new_width > 0):
        raise ctx.error(f"image_data_param.new_height and new_width must be given together "
                        f"(got new_height {new_height}, new_width {new_width})")
    for field in ("scale", "mean_file", "crop_size", "mirror"):
        if param.HasField(field):
            ctx.warn(f"image_data_param.{field} is ignored (as in Caffe); give it in transform_param")
    return ListSettings(source=source, root_folder=param.root_folder,
                        batch_size=int(param.batch_size), shuffle=bool(param.shuffle),
                        rand_skip=int(param.rand_skip),
                        new_size=(new_height, new_width) if new_height else (),
                        is_color=bool(param.is_color), ignore_label=int(param.ignore_label))


def read_mean_values(transform_param, channels, ctx):
    """transform_param.mean_value as one value per channel (a single value applies to all
    channels, as in Caffe), or () when absent."""
    values = [float(v) for v in transform_param.mean_value]
    if not values:
        return ()
    if len(values) == 1:
        return tuple(values * channels)
    if len(values) != channels:
        raise ctx.error(f"transform_param has {len(values)} mean_value entries for {channels}-channel "
                        f"images; expected 1 or {channels}")
    return tuple(values)


def warn_ignored_transform_fields(transform_param, layer_type, ctx):
    """Warn about the transform_param fields that the crop-and-mirror data layers ignore, as Caffe
    does: crop_height / crop_width (only crop_size counts) and scale_factors."""
    for field in ("crop_height", "crop_width"):
        if transform_param.HasField(field):
            ctx.warn(f"transform_param.{field} is ignored by {layer_type} (only crop_size is "
                     f"honoured, as in Caffe)")
    if len(transform_param.scale_factors):
        ctx.warn(f"transform_param.scale_factors is ignored by {layer_type} (as in Caffe)")


def read_joint_crop(transform_param, ctx):
    """(crop_height, crop_width) from crop_size or crop_height + crop_width, () for none."""
    crop_size = int(transform_param.crop_size)
    height, width = int(transform_param.crop_height), int(transform_param.crop_width)
    if crop_size and (height or width):
        raise ctx.error(f"transform_param: give either crop_size or crop_height/crop_width, not "
                        f"both (got crop_size {crop_size}, crop_height {height}, crop_width {width})")
    if (height > 0) != (width > 0):
        raise ctx.error(f"transform_param.crop_height and crop_width must be given together "
                        f"(got crop_height {height}, crop_width {width})")
    if crop_size:
        return (crop_size, crop_size)
    return (height, width) if height else ()


def label_pad_value(ignore_label, ctx):
    value = saturate_uint8(ignore_label)
    if value != ignore_label:
        ctx.warn(f"ignore_label {ignore_label} does not fit the 8-bit label images; padded and "
                 f"constant labels get {value} (as in Caffe)")
    return value


def warn_if_palette(path, ctx):
    try:
        palette = is_palette_image(path)
    except OSError:
        return  # unreadable files are reported when the first item is read
    if palette:
        ctx.warn(f"label image {path!r} is a palette PNG; like OpenCV it is read as grayscale "
                 f"luminance, not as palette indices (label PNGs must store class indices)")


def draw_seed_and_skip(rand_skip, count, ctx):
    """A seed for the layer's shuffle/augmentation stream and Caffe's random initial skip
    (uniform in [0, rand_skip)), both drawn from torch's global generator."""
    if rand_skip > count:
        raise ctx.error(f"image_data_param.rand_skip {rand_skip} exceeds the {count} items of the "
                        f"list (Caffe aborts when the drawn skip is past the end)")
    seed = int(torch.randint(2 ** 62, (1,)).item())
    skip = int(torch.randint(rand_skip, (1,)).item()) if rand_skip else 0
    return seed, skip


class ListDataLayer(BatchLayer):
    """A data layer fed by a list file: no bottoms; forward() returns the next batch, tops in
    order. Batches are assembled by a DataLoader (workers: $SEGAWARE_DATA_WORKERS, else
    min(2, CPUs)) and placed on the layer's device and dtype (those of the net)."""

    def __init__(self, *, reader, count, batch_size, shuffle, skip, seed, top_shapes,
                 num_workers=None):
        super().__init__()
        self.reader = reader
        self.count, self.shuffle = count, shuffle
        workers = default_num_workers() if num_workers is None else num_workers
        self._start_stream(ListDataset(reader, count),
                           EndlessSampler(count, shuffle=shuffle, skip=skip, seed=seed),
                           batch_size=batch_size, top_shapes=top_shapes, num_workers=workers,
                           collate=StackBatch(reader.layer_label))

    @classmethod
    def build(cls, ctx, *, reader, count, settings, crop_shapes=None, **kwargs):
        """The layer, with top shapes from `crop_shapes` (per-item shapes fixed by a crop) or
        else from the first item. The first item is read and transformed whenever its files
        exist, so bad settings (e.g. a crop larger than an image that cannot be padded) fail at
        build time; with a crop, a net still builds without its dataset (like the released
        configs, which point at the authors' machines) and a missing file fails at forward."""
        first_files_exist = all(os.path.isfile(f) for f in reader.files(0))
        if crop_shapes is None or first_files_exist:
            try:
                first = reader(0, torch.Generator().manual_seed(0))
            except DataError as e:
                raise data_setup_error(ctx, e) from None
            item_shapes = [array.shape for array in first]
        else:
            item_shapes = crop_shapes
        shapes = [(settings.batch_size,) + tuple(s) for s in item_shapes][:len(ctx.top_names)]
        seed, skip = draw_seed_and_skip(settings.rand_skip, count, ctx)
        return cls(reader=reader, count=count, batch_size=settings.batch_size,
                   shuffle=settings.shuffle, skip=skip, seed=seed, top_shapes=shapes, **kwargs)

    def extra_repr(self):
        return (f"items={self.count}, batch_size={self.batch_size}"
                + (", shuffle=True" if self.shuffle else ""))
