"""Label PNGs of a net's score map, one per image, as `segaware-caffe test --png` writes them.

Which image item n of a batch holds follows from the net's list-driven data layer (ImageSegData,
TwoImageData, ImageData): its batches walk the list in the order its sampler yields, so a second
walk of that sampler, from the start, names every item. The item's own size is read from its
image header (or is the layer's new_height x new_width): the layers pad an image bottom/right to
crop_size, so its pixels are the top-left of the map. An image larger than the crop is only seen
through its centre crop, so no whole-image PNG exists: that is an error naming the image.
"""
import os

import numpy as np

from segaware_caffe.files import CLI_HINT
from segaware_caffe.label_maps import LabelMapError, crop_to_image, image_size, labels_from_scores, \
    save_label_png
from segaware_caffe.tools.common import UsageError


def list_data_layer(net):
    """The first list-driven data layer record of the net (ImageSegData, TwoImageData,
    ImageData), or None."""
    from segaware_caffe.data.base import ListDataLayer

    return next((r for r in net.records if isinstance(r.module, ListDataLayer)), None)


def default_png_blob(net):
    """The blob the PNGs show by default: what the first MatWrite layer writes, else the first
    net output with several channels at the data's resolution."""
    writer = next((r for r in net.records if r.type == "MatWrite"), None)
    if writer is not None:
        return writer.bottoms[0]
    data = list_data_layer(net)
    size = tuple(net.blob_shapes[data.tops[0]][2:]) if data is not None else None
    for name in net.outputs:
        shape = tuple(net.blob_shapes.get(name, ()))
        if len(shape) == 4 and shape[1] > 1 and (size is None or shape[2:] == size):
            return name
    raise UsageError("no blob to write PNGs from: the net has no MatWrite layer and no 4-D "
                     "output with several channels at the input's size; name one with --png-blob")


class ImageItems:
    """(id, (height, width) or None) of each item of each batch, in the data layer's order."""

    def __init__(self, record):
        self.record = record
        module = record.module
        self.reader = module.reader
        self.count, self.batch_size = module.count, module.batch_size
        self.order = iter(module.stream.loader.sampler)
        transform = getattr(self.reader, "transform", None)
        if getattr(transform, "scale_factors", ()):
            raise UsageError(f"{record.name} ({record.type}): transform_param.scale_factors "
                             f"rescales each image by a random factor, so the score map cannot be "
                             f"mapped back to the image for --png")
        crop = getattr(transform, "crop", None)
        if crop is None and getattr(transform, "crop_size", 0):
            crop = (transform.crop_size, transform.crop_size)
        self.crop = tuple(crop) if crop else None

    def _path(self, index):
        item = self.reader.items[index]
        return item.image_path if hasattr(item, "image_path") else item[0]

    def next(self):
        index, _ = next(self.order)
        path = self._path(index)
        image_id = os.path.splitext(os.path.basename(path))[0]
        size = tuple(self.reader.new_size) if self.reader.new_size else image_size(path)
        if self.crop is not None and (size[0] > self.crop[0] or size[1] > self.crop[1]):
            raise LabelMapError(
                f"{self.record.name} ({self.record.type}): image {path} is {size[1]}x{size[0]} "
                f"(width x height), larger than the crop {self.crop[1]}x{self.crop[0]}, so the net "
                f"saw only its centre; for whole-image PNGs set crop_size to at least "
                f"{max(size)} (the released test nets pad every image to crop_size)")
        return image_id, size


class PngWriter:
    """Writes `<folder>/<id>.png` for every item of each forward's `blob`."""

    def __init__(self, net, blob, folder, *, overwrite=False):
        self.blob, self.folder, self.overwrite = blob, folder, overwrite
        if blob not in net.blob_shapes:
            raise UsageError(f"--png-blob {blob}: the net has no blob of that name")
        shape = tuple(net.blob_shapes[blob])
        if len(shape) != 4:
            raise UsageError(f"--png-blob {blob}: PNGs need a 4-D N x C x H x W score map, the "
                             f"blob has shape {shape}")
        record = list_data_layer(net)
        self.items = ImageItems(record) if record is not None else None
        if record is not None:
            data = tuple(net.blob_shapes[record.tops[0]])
            if shape[2:] != data[2:]:
                raise UsageError(f"--png-blob {blob} is {shape[3]}x{shape[2]} (width x height), the "
                                 f"input {record.tops[0]!r} {data[3]}x{data[2]}; give a blob at the "
                                 f"input's resolution (the released nets' *_interp blobs)")
        self.written, self.repeated, self.counter = set(), 0, 0

    def passes(self):
        """Batches of one walk through the list (None without a list-driven data layer)."""
        if self.items is None:
            return None
        return -(-self.items.count // self.items.batch_size)

    def write(self, scores):
        """Write the PNGs of one forward's score map (a tensor or array N x C x H x W)."""
        if hasattr(scores, "detach"):
            scores = scores.detach().to("cpu").float().numpy()
        scores = np.asarray(scores)
        for n in range(scores.shape[0]):
            if self.items is not None:
                image_id, size = self.items.next()
            else:
                image_id, size = f"{self.counter:06d}", None
            self.counter += 1
            if image_id in self.written:      # the list wrapped around: this image is done
                self.repeated += 1
                continue
            labels = labels_from_scores(scores[n], where=self.blob)
            if size is not None:
                labels = crop_to_image(labels, size, where=f"{self.blob} of image {image_id}")
            save_label_png(labels, os.path.join(self.folder, f"{image_id}.png"),
                           overwrite=self.overwrite, hint=CLI_HINT)
            self.written.add(image_id)
