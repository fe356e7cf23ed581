"""Caffe's DataTransformer, as the image data layers use it.

Two variants:
- `JointTransform`: DeepLab v2's image + label transform (ImageSegData, and TwoImageData by the
  same rules): optional random scale factor, pad bottom/right to the crop size (image with the
  mean, label with ignore_label), crop (TRAIN random, TEST centred), optional mirror, then
  (pixel - mean) * scale in float64.
- `CropMirrorTransform`: BVLC's transform of one image (ImageData): no padding (an image smaller
  than the crop is an error), crop, mirror, (pixel - mean) * scale in float32, mean from
  mean_value or a mean file.

Inputs are OpenCV-layout uint8 arrays (H x W x C in BGR order, or H x W); outputs are CHW.
Random choices come from a torch.Generator per item, so results do not depend on how items are
spread over loader workers.
"""
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SegawareError
from .images import resize_bilinear, resize_nearest


def _randint(generator, high):
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator).item())


def _hwc(array):
    return array[:, :, None] if array.ndim == 2 else array


def crop_offsets(height, width, crop_height, crop_width, random_crop, generator):
    """Caffe's crop offsets: uniform in {0..H-Hc} when random (TRAIN), else (H-Hc) div 2."""
    if random_crop:
        return (_randint(generator, height - crop_height + 1),
                _randint(generator, width - crop_width + 1))
    return (height - crop_height) // 2, (width - crop_width) // 2


@dataclass(frozen=True)
class JointTransform:
    crop: tuple            # (crop_height, crop_width), or () for no crop
    mean: tuple            # one value per image channel (B, G, R order), or () for none
    scale: float
    mirror: bool
    random_crop: bool      # TRAIN phase
    scale_factors: tuple
    label_pad: int         # ignore_label saturated to 0..255 (labels are 8-bit images)

    def __call__(self, image, label, generator):
        """image: H x W [x C] uint8; label: H x W [x C] uint8 of the same size. Returns
        (data float32 C x Hc x Wc, label float32 Cl x Hc x Wc, data_dim float32 1 x 1 x 2)."""
        image, label = _hwc(image), _hwc(label)
        rows, cols = image.shape[:2]
        crop_height, crop_width = self.crop or (rows, cols)
        # data_dim: the valid (unpadded) extent, from the size before any scale factor
        data_dim = np.array([[[min(crop_height, rows), min(crop_width, cols)]]], dtype=np.float32)

        if self.scale_factors:
            factor = self.scale_factors[_randint(generator, len(self.scale_factors))]
            if factor != 1:
                new_rows, new_cols = int(rows * factor), int(cols * factor)
                image = _hwc(resize_bilinear(image, new_rows, new_cols))
                label = _hwc(resize_nearest(label, new_rows, new_cols))
                rows, cols = new_rows, new_cols
        if not self.crop:
            crop_height, crop_width = rows, cols

        mean = np.asarray(self.mean or (0.0,) * image.shape[2], dtype=np.float64)
        pad_rows, pad_cols = max(crop_height - rows, 0), max(crop_width - cols, 0)
        pixels = image.astype(np.float64)
        if pad_rows or pad_cols:
            padded = np.empty((rows + pad_rows, cols + pad_cols, image.shape[2]), np.float64)
            padded[...] = mean  # padded pixels become exactly 0 after mean subtraction
            padded[:rows, :cols] = pixels
            pixels = padded
            padded_label = np.full((rows + pad_rows, cols + pad_cols, label.shape[2]),
                                   self.label_pad, np.uint8)
            padded_label[:rows, :cols] = label
            label = padded_label

        top, left = crop_offsets(pixels.shape[0], pixels.shape[1], crop_height, crop_width,
                                 self.random_crop, generator)
        pixels = pixels[top:top + crop_height, left:left + crop_width]
        label = label[top:top + crop_height, left:left + crop_width]
        if self.mirror and _randint(generator, 2):
            pixels, label = pixels[:, ::-1], label[:, ::-1]

        data = ((pixels - mean) * self.scale).astype(np.float32)
        return (np.ascontiguousarray(data.transpose(2, 0, 1)),
                np.ascontiguousarray(label.transpose(2, 0, 1).astype(np.float32)),
                data_dim)


class ImageTransformError(SegawareError, ValueError):
    """The image does not fit the transform (smaller than the crop, or not the mean file's size)."""


@dataclass(frozen=True)
class CropMirrorTransform:
    crop_size: int         # 0 = no crop
    mean_values: tuple     # (), one value for all channels, or one per channel
    mean_image: object     # None or float32 array C x H x W (from mean_file)
    scale: float
    mirror: bool
    random_crop: bool

    def __call__(self, image, generator):
        """image: H x W [x C] uint8 -> float32 C x Hc x Wc."""
        image = _hwc(image)
        height, width, channels = image.shape
        crop = self.crop_size
        if crop and (height < crop or width < crop):
            raise ImageTransformError(f"image is {height}x{width}, smaller than crop_size {crop} "
                                      f"(ImageData does not pad)")
        if self.mean_image is not None and self.mean_image.shape != (channels, height, width):
            raise ImageTransformError(f"image is {channels}x{height}x{width} (CxHxW) but the mean "
                                      f"file is {'x'.join(map(str, self.mean_image.shape))}")
        top = left = 0
        out_height, out_width = height, width
        if crop:
            top, left = crop_offsets(height, width, crop, crop, self.random_crop, generator)
            out_height = out_width = crop
        mirror = self.mirror and _randint(generator, 2)
        pixels = image[top:top + out_height, left:left + out_width].transpose(2, 0, 1)
        pixels = pixels.astype(np.float32)
        if self.mean_image is not None:
            pixels = pixels - self.mean_image[:, top:top + out_height, left:left + out_width]
        elif self.mean_values:
            mean = np.broadcast_to(np.asarray(self.mean_values, np.float32), (channels,))
            pixels = pixels - mean[:, None, None]
        if self.scale != 1:
            pixels = pixels * np.float32(self.scale)
        if mirror:
            pixels = pixels[:, :, ::-1]
        return np.ascontiguousarray(pixels, dtype=np.float32)
