"""TwoImageData: the image/label-image reader the released embs and vgg configs name but the fork
never had, so it is implemented the way those configs use it: like ImageSegData with label_type PIXEL, the
same random scale, crop and mirror for both images, the image padded with the mean and the label
with ignore_label (255)."""
from ..data.base import ListDataLayer, read_list_settings, warn_if_palette
from ..data.listfile import read_lines
from ..data.readers import SegItem, SegItemReader
from ..layer import register_layer
from .image_seg_data import joint_transform, seg_crop_shapes


@register_layer("TwoImageData")
class TwoImageData(ListDataLayer):
    """Tops: data (N,C,Hc,Wc), label (N,Cl,Hc,Wc), optional data_dim (N,1,1,2). List lines:
    `image_path label_path`. two_image_data_param { first_is_color (true) second_is_color
    (false) } choose 3-channel BGR or grayscale reading of each (image_data_param.is_color is not
    used). new_height/new_width resize the label with nearest neighbour (labels are class
    indices; ImageSegData's bilinear label resize is a quirk of the original we do not extend)."""
    TOPS = (2, 3)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        settings = read_list_settings(layer_param, ctx)
        colors = layer_param.two_image_data_param
        if layer_param.image_data_param.HasField("is_color"):
            ctx.warn("image_data_param.is_color is not used by TwoImageData; set "
                     "two_image_data_param { first_is_color second_is_color }")
        lines = read_lines(settings.source)
        if not lines:
            raise ctx.error(f"list {settings.source} has no items")
        items = []
        for line in lines:
            if len(line.tokens) < 2:
                raise ctx.error(f"list lines must be `image_path label_path`; list "
                                f"{settings.source}, line {line.number} has only "
                                f"{line.tokens[0]!r}")
            items.append(SegItem(settings.root_folder + line.tokens[0],
                                 settings.root_folder + line.tokens[1], 0, line))
        if not colors.second_is_color:
            warn_if_palette(items[0].label_path, ctx)
        channels = 3 if colors.first_is_color else 1
        transform = joint_transform(layer_param, ctx, channels, settings.ignore_label)
        reader = SegItemReader(layer_label=f"{ctx.name} ({ctx.type})", source=settings.source,
                               items=tuple(items), image_color=bool(colors.first_is_color),
                               label_color=bool(colors.second_is_color),
                               new_size=settings.new_size, label_resize="nearest",
                               transform=transform)
        label_channels = 3 if colors.second_is_color else 1
        return cls.build(ctx, reader=reader, count=len(items), settings=settings,
                         crop_shapes=seg_crop_shapes(transform, channels, label_channels))
