"""Per-item readers of the image data layers: list item -> transformed numpy arrays (one per top).

Readers run inside DataLoader workers, so they hold only plain values and report failures as
`DataError` naming the layer, the file and the list line.
"""
from dataclasses import dataclass

import numpy as np

from .images import DataError, ImageReadError, read_image, resize_bilinear, resize_nearest
from .transforms import ImageTransformError


@dataclass(frozen=True)
class SegItem:
    image_path: str
    label_path: str        # "" when the label is a constant image
    label_value: int       # the constant (0..255) when label_path is ""
    line: object           # ListLine


def _where(layer_label, source, line):
    return f"{layer_label}: list {source}, line {line.number} ({' '.join(line.tokens)!r})"


def _read(path, color, what, layer_label, source, line):
    try:
        return read_image(path, color)
    except ImageReadError as e:
        raise DataError(f"{_where(layer_label, source, line)}: cannot read {what} {e.path!r}: "
                        f"{e.reason}") from None


@dataclass(frozen=True)
class SegItemReader:
    """ImageSegData / TwoImageData: (data, label, data_dim) of one item."""
    layer_label: str       # "name (Type)"
    source: str
    items: tuple           # SegItem
    image_color: bool
    label_color: bool
    new_size: tuple        # (new_height, new_width) or ()
    label_resize: str      # "bilinear" (ImageSegData, as the original) or "nearest"
    transform: object      # JointTransform

    def files(self, index):
        item = self.items[index]
        return [item.image_path] + ([item.label_path] if item.label_path else [])

    def __call__(self, index, generator):
        item = self.items[index]
        where = (self.layer_label, self.source, item.line)
        image = _read(item.image_path, self.image_color, "image", *where)
        if self.new_size:
            image = resize_bilinear(image, *self.new_size)
        if item.label_path:
            label = _read(item.label_path, self.label_color, "label image", *where)
            if self.new_size:
                resize = resize_bilinear if self.label_resize == "bilinear" else resize_nearest
                label = resize(label, *self.new_size)
            if label.shape[:2] != image.shape[:2]:
                raise DataError(f"{_where(*where)}: label image {item.label_path!r} is "
                                f"{label.shape[0]}x{label.shape[1]} but the image is "
                                f"{image.shape[0]}x{image.shape[1]}; they must have the same size")
        else:
            label = np.full(image.shape[:2], item.label_value, np.uint8)
        return self.transform(image, label, generator)


@dataclass(frozen=True)
class ClassItemReader:
    """ImageData: (data, label) of one item; the label is the list's integer class."""
    layer_label: str
    source: str
    items: tuple           # (image_path, class_label, ListLine)
    color: bool
    new_size: tuple
    transform: object      # CropMirrorTransform

    def files(self, index):
        return [self.items[index][0]]

    def __call__(self, index, generator):
        path, label, line = self.items[index]
        where = (self.layer_label, self.source, line)
        image = _read(path, self.color, "image", *where)
        if self.new_size:
            image = resize_bilinear(image, *self.new_size)
        try:
            data = self.transform(image, generator)
        except ImageTransformError as e:
            raise DataError(f"{_where(*where)}: image {path!r}: {e}") from None
        return data, np.array(label, dtype=np.float32)
