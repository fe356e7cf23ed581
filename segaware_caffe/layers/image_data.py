"""ImageData (BVLC): list lines `path int_label`; tops data (N,C,Hc,Wc) and label (N,)."""
import numpy as np

from segaware_caffe import caffe_proto

from ..data.base import (ListDataLayer, read_list_settings, read_mean_values,
                         warn_ignored_transform_fields)
from ..data.listfile import c_atoi, read_lines, resolve_file
from ..data.readers import ClassItemReader
from ..data.transforms import CropMirrorTransform
from ..layer import register_layer


def _parse_int(token):
    try:
        return int(token)
    except ValueError:
        return None


@register_layer("ImageData")
class ImageData(ListDataLayer):
    """List lines `path label`: a missing or non-integer label reads as atoi of the last token
    (so 0 for a path), with a warning. (The fork's ImageData stopped reading at such a line;
    BVLC's later reader behaves as here, which lets vgg/test_voc_test's unlabelled list load.)
    No padding: every image must be at least crop_size (TRAIN random crop, TEST centred);
    mirror with probability 1/2 when set; data = (pixel - mean) * scale in float32, BGR order.
    Only transform_param.crop_size is honoured (not crop_height/crop_width, not scale_factors)."""
    TOPS = (2, 2)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        settings = read_list_settings(layer_param, ctx)
        lines = read_lines(settings.source)
        if not lines:
            raise ctx.error(f"list {settings.source} has no items")
        items, unlabelled = [], []
        for line in lines:
            # `path label`, the label being the last token (atoi, as BVLC Caffe's later
            # line-based reader); a line without an integer label gets label 0
            path_tokens = line.tokens[:-1] if len(line.tokens) > 1 else line.tokens
            label_token = line.tokens[-1] if len(line.tokens) > 1 else ""
            if len(line.tokens) == 1 or _parse_int(label_token) is None:
                unlabelled.append(line)
            items.append((settings.root_folder + " ".join(path_tokens), c_atoi(label_token), line))
        if unlabelled:
            first = unlabelled[0]
            ctx.warn(f"list {settings.source}: {len(unlabelled)} line(s) have no integer label "
                     f"(first: line {first.number}, {' '.join(first.tokens)!r}); their label is "
                     f"atoi of the last token (0 for a path). ImageData expects `path label`")

        tp = layer_param.transform_param
        channels = 3 if settings.is_color else 1
        warn_ignored_transform_fields(tp, "ImageData", ctx)
        mean_image = None
        if tp.HasField("mean_file"):
            if len(tp.mean_value):
                raise ctx.error("transform_param: give either mean_file or mean_value, not both")
            path = resolve_file(tp.mean_file, ctx, "transform_param.mean_file")
            mean_image = np.asarray(caffe_proto.read_blob(path), dtype=np.float32)
            if mean_image.ndim == 4 and mean_image.shape[0] == 1:
                mean_image = mean_image[0]
            if mean_image.ndim != 3 or mean_image.shape[0] != channels:
                raise ctx.error(f"mean_file {path} holds a blob of shape {mean_image.shape}; "
                                f"expected (1, {channels}, H, W) for {channels}-channel images")
        transform = CropMirrorTransform(crop_size=int(tp.crop_size),
                                        mean_values=read_mean_values(tp, channels, ctx),
                                        mean_image=mean_image, scale=float(tp.scale),
                                        mirror=bool(tp.mirror),
                                        random_crop=ctx.phase == "TRAIN")
        reader = ClassItemReader(layer_label=f"{ctx.name} ({ctx.type})", source=settings.source,
                                 items=tuple(items), color=settings.is_color,
                                 new_size=settings.new_size, transform=transform)
        crop = int(tp.crop_size)
        return cls.build(ctx, reader=reader, count=len(items), settings=settings,
                         crop_shapes=[(channels, crop, crop), ()] if crop else None)
