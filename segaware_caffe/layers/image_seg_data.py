"""ImageSegData (DeepLab v2): image + label image (or constant label) + data_dim, with pad-to-crop."""
import re

from segaware_caffe.caffe_proto import caffe_pb2

from ..data.base import (ListDataLayer, label_pad_value, read_joint_crop, read_list_settings,
                         read_mean_values, warn_if_palette)
from ..data.listfile import c_atoi, read_lines, saturate_uint8
from ..data.readers import SegItem, SegItemReader
from ..data.transforms import JointTransform
from ..layer import register_layer

LabelType = caffe_pb2.ImageDataParameter.LabelType


def joint_transform(layer_param, ctx, channels, ignore_label):
    tp = layer_param.transform_param
    if tp.HasField("mean_file"):
        raise ctx.error("transform_param.mean_file is not supported by this layer (as in the "
                        "original); give mean_value (B, G, R)")
    return JointTransform(crop=read_joint_crop(tp, ctx),
                          mean=read_mean_values(tp, channels, ctx),
                          scale=float(tp.scale), mirror=bool(tp.mirror),
                          random_crop=ctx.phase == "TRAIN",
                          scale_factors=tuple(float(f) for f in tp.scale_factors),
                          label_pad=label_pad_value(ignore_label, ctx))


def seg_crop_shapes(transform, channels, label_channels):
    """Per-item top shapes fixed by the crop (None without a crop)."""
    if not transform.crop:
        return None
    return [(channels,) + transform.crop, (label_channels,) + transform.crop, (1, 1, 2)]


@register_layer("ImageSegData")
class ImageSegData(ListDataLayer):
    """Tops: data (N,C,Hc,Wc), label (N,1,Hc,Wc), optional data_dim (N,1,1,2) = valid height and
    width. List lines: `image [label]`; label_type PIXEL reads the label image, IMAGE (the
    default!) parses the second token as an integer class (atoi: a path gives 0), NONE gives
    ignore_label everywhere."""
    TOPS = (2, 3)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        settings = read_list_settings(layer_param, ctx)
        label_type = layer_param.image_data_param.label_type
        lines = read_lines(settings.source)
        if not lines:
            raise ctx.error(f"list {settings.source} has no items")
        items = []
        for line in lines:
            image_path = settings.root_folder + line.tokens[0]
            label_path, label_value = "", saturate_uint8(settings.ignore_label)
            if label_type == LabelType.PIXEL:
                if len(line.tokens) < 2:
                    raise ctx.error(f"label_type PIXEL needs `image label_image` lines; list "
                                    f"{settings.source}, line {line.number} has only "
                                    f"{line.tokens[0]!r}")
                label_path = settings.root_folder + line.tokens[1]
            elif label_type == LabelType.IMAGE:
                label_value = saturate_uint8(c_atoi(line.tokens[1]) if len(line.tokens) > 1 else 0)
            items.append(SegItem(image_path, label_path, label_value, line))
        if label_type == LabelType.IMAGE and len(lines[0].tokens) > 1 \
                and not re.fullmatch(r"[+-]?\d+", lines[0].tokens[1]):
            ctx.warn(f"label_type defaults to IMAGE, so the second token of each list line is "
                     f"parsed as an integer class ({lines[0].tokens[1]!r} -> 0, as in Caffe); set "
                     f"image_data_param {{ label_type: PIXEL }} to read label images")
        if items[0].label_path:
            warn_if_palette(items[0].label_path, ctx)
        channels = 3 if settings.is_color else 1
        transform = joint_transform(layer_param, ctx, channels, settings.ignore_label)
        reader = SegItemReader(layer_label=f"{ctx.name} ({ctx.type})", source=settings.source,
                               items=tuple(items), image_color=settings.is_color,
                               label_color=False, new_size=settings.new_size,
                               label_resize="bilinear",  # the original resizes labels bilinearly
                               transform=transform)
        return cls.build(ctx, reader=reader, count=len(items), settings=settings,
                         crop_shapes=seg_crop_shapes(transform, channels, 1))
