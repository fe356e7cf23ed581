"""FloData (FlowNet): optical-flow fields from Middlebury .flo files listed in a text file."""
import os
from dataclasses import dataclass

from ..data.base import ListDataLayer, read_list_settings
from ..data.flo import read_flo
from ..data.listfile import read_tokens, resolve_item
from ..layer import register_layer


@dataclass(frozen=True)
class FloItemReader:
    """One item: the (2, H, W) flow of file `index`."""
    layer_label: str
    paths: tuple

    def files(self, index):
        return [self.paths[index]]

    def __call__(self, index, generator):
        return (read_flo(self.paths[index], self.layer_label),)


@register_layer("FloData")
class FloData(ListDataLayer):
    """image_data_param { source root_folder batch_size shuffle rand_skip }: every whitespace
    token of `source` names a .flo file (root_folder + token; relative paths from the working
    directory, else beside the prototxt). One top, flow (batch, 2, H, W), channel 0 = u. The list
    is walked in order and wraps around (reshuffled each pass with shuffle); all files of a batch
    must have the first file's size. There is no label top and no transform (transform_param is
    ignored, as in the original)."""
    TOPS = (1, 1)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        settings = read_list_settings(layer_param, ctx)
        param = layer_param.image_data_param
        for field in ("new_height", "new_width", "is_color", "label_type"):
            if param.HasField(field):
                ctx.warn(f"image_data_param.{field} is ignored by FloData (as in the original)")
        if layer_param.HasField("transform_param"):
            ctx.warn("transform_param is ignored by FloData (as in the original)")
        paths = tuple(os.path.abspath(resolve_item(settings.root_folder + token, ctx.base_dir))
                      for _, token in read_tokens(settings.source))
        if not paths:
            raise ctx.error(f"list {settings.source} names no .flo files")
        reader = FloItemReader(layer_label=f"{ctx.name} ({ctx.type})", paths=paths)
        return cls.build(ctx, reader=reader, count=len(paths), settings=settings)
