"""Data: Datum records of an LMDB or LevelDB database, through Caffe's DataTransformer."""
import os
from dataclasses import dataclass

import numpy as np

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import caffe_pb2

from ..data.base import warn_ignored_transform_fields
from ..data.db import DataError, decode_datum, first_record, record_where, records
from ..data.images import data_setup_error
from ..data.listfile import resolve_dir, resolve_file
from ..data.optional import require_at_build
from ..data.stream import StreamDataLayer, draw_seed
from ..data.transforms import CropMirrorTransform, ImageTransformError
from .. import limits
from ..layer import register_layer

_MODULE_OF_BACKEND = {"LMDB": "lmdb", "LEVELDB": "plyvel"}


def load_mean_file(path):
    """A mean file (BlobProto, usually 1 x C x H x W) as a C x H x W float32 array."""
    mean = np.asarray(caffe_proto.read_blob(path), dtype=np.float32)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    return mean


def read_mean_file(transform_param, ctx):
    """(absolute path, C x H x W array) of transform_param.mean_file, or (None, None) unset."""
    if not transform_param.HasField("mean_file"):
        return None, None
    path = os.path.abspath(resolve_file(transform_param.mean_file, ctx,
                                        "transform_param.mean_file"))
    return path, load_mean_file(path)


@dataclass(frozen=True)
class DatumItems:
    """The records of the database in key order, forever, each decoded and transformed into
    (data C x Hc x Wc float32, label)."""
    path: str
    backend: str
    label: str
    color: object            # None (as stored), True (force_color) or False (force_gray)
    crop_size: int
    transform: CropMirrorTransform

    def item(self, key, value, generator):
        where = record_where(self.label, self.path, key)
        datum = decode_datum(value, where, self.color)
        height, width, channels = datum.image.shape
        if self.crop_size and (height < self.crop_size or width < self.crop_size):
            raise DataError(f"{where}: the image is {height}x{width}, smaller than crop_size "
                            f"{self.crop_size}")
        means = len(self.transform.mean_values)
        if means not in (0, 1, channels):
            raise DataError(f"{where}: the image has {channels} channels but transform_param "
                            f"gives {means} mean_value entries; give 1 or {channels}")
        try:
            data = self.transform(datum.image, generator)
        except ImageTransformError as e:
            raise DataError(f"{where}: {e}") from None
        return data, np.array(datum.label, dtype=np.float32)

    def __call__(self, generator):
        for key, value in records(self.path, self.backend, self.label):
            yield self.item(key, value, generator)


@register_layer("Data")
class Data(StreamDataLayer):
    """data_param { source backend (default LEVELDB) batch_size } and transform_param { scale
    mean_value | mean_file crop_size mirror force_color force_gray }. Records are read in key order
    and wrap around. Each Datum holds raw uint8 bytes (channels x height x width, BGR for images),
    float_data, or an encoded image (encoded: true; decoded like OpenCV's imdecode, through
    Pillow). Transform, in float32: crop (TRAIN: random offsets, TEST: centred, (H - crop) div 2),
    (x - mean) * scale with the mean per channel or per pixel (mean_file, cropped at the same
    place), mirror with probability 1/2 in either phase. Tops: data (batch, C, H', W') and label
    (batch,). Random crops and mirrors come from torch's generator (Caffe used its own mt19937).
    data_param's own scale/mean_file/crop_size/mirror (the pre-transform_param fields), rand_skip
    and force_encoded_color are ignored, as the fork's Data layer ignores them."""
    TOPS = (1, 2)

    def __init__(self, *, source, backend, batch_size, crop_size=0, mean_values=(), mean_file=None,
                 scale=1.0, mirror=False, random_crop=False, color=None, seed=0, top_shapes=(),
                 label="Data", num_workers=None):
        super().__init__()
        if backend not in _MODULE_OF_BACKEND:
            raise ValueError(f"{label}: backend must be LMDB or LEVELDB, got {backend!r}")
        self.source, self.backend = source, backend
        transform = CropMirrorTransform(
            crop_size=int(crop_size), mean_values=tuple(float(v) for v in mean_values),
            mean_image=load_mean_file(mean_file) if mean_file else None, scale=float(scale),
            mirror=bool(mirror), random_crop=bool(random_crop))
        items = DatumItems(path=source, backend=backend, label=label, color=color,
                           crop_size=int(crop_size), transform=transform)
        self._setup_stream(produce=items, seed=seed, batch_size=batch_size, top_shapes=top_shapes,
                           label=label, num_workers=num_workers)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        param, tp = layer_param.data_param, layer_param.transform_param
        backend = caffe_pb2.DataParameter.DB.Name(param.backend)
        require_at_build(_MODULE_OF_BACKEND[backend], ctx)
        if param.batch_size <= 0:
            raise ctx.error(f"data_param.batch_size must be > 0, got {param.batch_size}")
        limits.check(param.batch_size, "batch_size", "data_param.batch_size",
                     f"{ctx.name} ({ctx.type})")
        for field in ("scale", "mean_file", "crop_size", "mirror", "rand_skip",
                      "force_encoded_color"):
            if param.HasField(field):
                where = ("give it in transform_param" if field in ("scale", "mean_file",
                                                                    "crop_size", "mirror")
                         else "the fork's Data layer does not implement it")
                ctx.warn(f"data_param.{field} is ignored (as in Caffe); {where}")
        warn_ignored_transform_fields(tp, "Data", ctx)
        if tp.force_color and tp.force_gray:
            raise ctx.error("transform_param: cannot set both force_color and force_gray")
        if tp.HasField("mean_file") and len(tp.mean_value):
            raise ctx.error("transform_param: give either mean_file or mean_value, not both")
        color = True if tp.force_color else (False if tp.force_gray else None)
        source = os.path.abspath(resolve_dir(param.source, ctx, "data_param.source"))
        label = f"{ctx.name} ({ctx.type})"

        # the first record fixes the top shapes (Caffe's InferBlobShape), and is checked now
        try:
            key, value = first_record(source, backend, label)
            where = record_where(label, source, key)
            first = decode_datum(value, where, color)
        except DataError as e:
            raise data_setup_error(ctx, e) from None
        if color is not None and not caffe_pb2.Datum.FromString(value).encoded:
            ctx.warn("transform_param force_color/force_gray only apply to encoded records (as in "
                     "Caffe); the records are raw")
        height, width, channels = first.image.shape
        crop = int(tp.crop_size)
        if crop and (height < crop or width < crop):
            raise ctx.error(f"crop_size {crop} is larger than the first record's image "
                            f"({height}x{width}, {where.removeprefix(label + ': ')})")
        if len(tp.mean_value) not in (0, 1, channels):
            raise ctx.error(f"transform_param has {len(tp.mean_value)} mean_value entries for "
                            f"{channels}-channel records; give 1 or {channels}")
        mean_file, mean = read_mean_file(tp, ctx)
        if mean is not None and mean.shape != (channels, height, width):
            raise ctx.error(f"mean_file {mean_file} holds a blob of shape {mean.shape}; the "
                            f"records are {(channels, height, width)} (C, H, W)")
        top_shapes = [(int(param.batch_size), channels, crop or height, crop or width),
                      (int(param.batch_size),)][:len(ctx.top_names)]
        return cls(source=source, backend=backend, batch_size=int(param.batch_size),
                   crop_size=crop, mean_values=tuple(float(v) for v in tp.mean_value),
                   mean_file=mean_file, scale=float(tp.scale), mirror=bool(tp.mirror),
                   random_crop=ctx.phase == "TRAIN", color=color, seed=draw_seed(),
                   top_shapes=top_shapes, label=label)

    def extra_repr(self):
        return f"source={self.source!r}, backend={self.backend}, batch_size={self.batch_size}"
