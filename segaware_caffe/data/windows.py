"""R-CNN window files and window crops (the WindowData layer).

A window file is a sequence of image blocks:
    # <image_index>
    <image path>
    <channels> <height> <width>
    <number of windows>
    <label> <overlap> <x1> <y1> <x2> <y2>      (one line per window; corners inclusive)
Whitespace separates the fields (Caffe reads them with >>), so line breaks do not matter.
"""
from dataclasses import dataclass

import numpy as np

from .images import DataError, cv_resize_linear_u8

f32 = np.float32


class WindowFileError(ValueError):
    """A window file that does not have the format above (the message names file and line)."""


@dataclass(frozen=True)
class Window:
    image: int             # the block's image_index: the 0-based position of its image in the file
    label: int
    x1: int
    y1: int
    x2: int
    y2: int
    line: int


@dataclass(frozen=True)
class WindowFile:
    images: tuple          # image paths (root_folder + path), in file order
    channels: int          # of the last image block (what sizes the data top)
    foreground: tuple      # Window, overlap >= fg_threshold
    background: tuple      # Window, overlap < bg_threshold (label 0)
    indices_in_order: bool  # whether every block's image_index is its position


def parse_window_file(path, root_folder, fg_threshold, bg_threshold):
    """Read a window file; windows with fg_threshold > overlap >= bg_threshold are dropped (as in
    Caffe). Raises WindowFileError."""
    with open(path) as f:
        tokens = [(number, token) for number, text in enumerate(f, start=1) for token in text.split()]
    position = 0

    def take(what, kind):
        nonlocal position
        if position >= len(tokens):
            raise WindowFileError(f"window file {path} ends early: expected {what}")
        number, token = tokens[position]
        position += 1
        if kind is str:
            return token, number
        try:
            return (int(token) if kind is int else float(token)), number
        except ValueError:
            raise WindowFileError(f"window file {path}, line {number}: expected {what} (a number), "
                                  f"got {token!r}") from None

    if not tokens:
        raise WindowFileError(f"window file {path} is empty")
    fg_threshold, bg_threshold = f32(fg_threshold), f32(bg_threshold)
    images, foreground, background, indices = [], [], [], []
    channels = 0
    while position < len(tokens):
        hashtag, number = take("'#'", str)
        if hashtag != "#":
            raise WindowFileError(f"window file {path}, line {number}: expected '#' starting an "
                                  f"image block, got {hashtag!r}")
        image_index, _ = take("the image index after '#'", int)
        image_path, _ = take("an image path", str)
        channels, _ = take("the image's channels", int)
        take("the image's height", int)
        take("the image's width", int)
        count, number = take("the number of windows", int)
        if count < 0:
            raise WindowFileError(f"window file {path}, line {number}: negative number of windows")
        images.append(root_folder + image_path)
        indices.append(image_index)
        for _ in range(count):
            label, number = take("a window's label", int)
            overlap, _ = take("a window's overlap", float)
            x1, _ = take("x1", int)
            y1, _ = take("y1", int)
            x2, _ = take("x2", int)
            y2, _ = take("y2", int)
            if f32(overlap) >= fg_threshold:
                if label <= 0:
                    raise WindowFileError(f"window file {path}, line {number}: a foreground window "
                                          f"(overlap {overlap} >= fg_threshold) must have a label "
                                          f"> 0, got {label}")
                foreground.append(Window(image_index, label, x1, y1, x2, y2, number))
            elif f32(overlap) < bg_threshold:
                background.append(Window(image_index, 0, x1, y1, x2, y2, number))
    for window in foreground + background:
        if not 0 <= window.image < len(images):
            raise WindowFileError(
                f"window file {path}, line {window.line}: the window belongs to image block "
                f"'# {window.image}', but windows read image number image_index (0-based, in file "
                f"order) and the file has {len(images)} image(s)")
    return WindowFile(tuple(images), channels, tuple(foreground), tuple(background),
                      indices == list(range(len(indices))))


def _c_round(value):
    """C's round() of a float: halves away from zero."""
    value = float(value)
    return int(np.sign(value) * np.floor(abs(value) + 0.5))


@dataclass(frozen=True)
class WindowCrop:
    """Caffe's WindowData crop of one window into a crop_size x crop_size item, in float32 like
    the original: optional context padding and squaring of the box, clipping to the image with
    the clipped part left as zero padding, cv::resize (INTER_LINEAR, 8-bit) of the box, optional
    horizontal flip, then (pixel - mean) * scale."""
    crop_size: int
    context_pad: int
    square: bool
    scale: float
    mean_values: tuple      # one per channel (after replication), or ()
    mean_image: object      # None or C x H x W float32 (mean_file)

    def geometry(self, window, rows, cols, mirror):
        """(x1, y1, x2, y2) of the image region, its warped (height, width), and where it goes
        in the item (pad_h, pad_w)."""
        crop = self.crop_size
        x1, y1, x2, y2 = window.x1, window.y1, window.x2, window.y2
        out_h = out_w = crop
        pad_h = pad_w = 0
        if self.context_pad > 0 or self.square:
            context_scale = f32(crop) / f32(crop - 2 * self.context_pad)
            half_height = f32((y2 - y1 + 1) / 2.0)
            half_width = f32((x2 - x1 + 1) / 2.0)
            center_x = f32(x1) + half_width
            center_y = f32(y1) + half_height
            if self.square:
                half_height = half_width = max(half_height, half_width)
            x1 = _c_round(center_x - half_width * context_scale)
            x2 = _c_round(center_x + half_width * context_scale)
            y1 = _c_round(center_y - half_height * context_scale)
            y2 = _c_round(center_y + half_height * context_scale)
            unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
            pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
            pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
            x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
            scale_x = f32(crop) / f32(unclipped_w)
            scale_y = f32(crop) / f32(unclipped_h)
            out_w = _c_round(f32(x2 - x1 + 1) * scale_x)
            out_h = _c_round(f32(y2 - y1 + 1) * scale_y)
            pad_x1, pad_x2 = _c_round(f32(pad_x1) * scale_x), _c_round(f32(pad_x2) * scale_x)
            pad_y1 = _c_round(f32(pad_y1) * scale_y)
            pad_h = pad_y1
            pad_w = pad_x2 if mirror else pad_x1   # a mirrored item mirrors its padding
            out_h = min(out_h, crop - pad_h)
            out_w = min(out_w, crop - pad_w)
        return (x1, y1, x2, y2), (out_h, out_w), (pad_h, pad_w)

    def __call__(self, image, window, mirror, where):
        """image: H x W x C uint8 (BGR) -> C x crop x crop float32."""
        rows, cols, channels = image.shape
        (x1, y1, x2, y2), (out_h, out_w), (pad_h, pad_w) = self.geometry(window, rows, cols, mirror)
        if not (0 <= x1 <= x2 < cols and 0 <= y1 <= y2 < rows):
            raise DataError(f"{where}: window ({window.x1}, {window.y1}, {window.x2}, {window.y2}) "
                            f"gives the region x {x1}..{x2}, y {y1}..{y2}, which is not inside the "
                            f"{rows}x{cols} image")
        if out_h <= 0 or out_w <= 0:
            raise DataError(f"{where}: window ({window.x1}, {window.y1}, {window.x2}, {window.y2}) "
                            f"warps to {out_h}x{out_w} pixels; nothing is left to crop")
        warped = cv_resize_linear_u8(image[y1:y2 + 1, x1:x2 + 1], out_h, out_w)
        if warped.ndim == 2:
            warped = warped[:, :, None]
        if mirror:
            warped = warped[:, ::-1]
        pixels = warped.transpose(2, 0, 1).astype(np.float32)
        if self.mean_image is not None:
            offset = (self.mean_image.shape[2] - self.crop_size) // 2
            top, left = offset + pad_h, offset + pad_w
            pixels = pixels - self.mean_image[:channels, top:top + out_h, left:left + out_w]
        elif self.mean_values:
            pixels = pixels - np.asarray(self.mean_values, np.float32)[:channels, None, None]
        pixels = pixels * f32(self.scale)
        item = np.zeros((channels, self.crop_size, self.crop_size), np.float32)
        item[:, pad_h:pad_h + out_h, pad_w:pad_w + out_w] = pixels
        return item
