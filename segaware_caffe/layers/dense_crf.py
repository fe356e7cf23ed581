"""DenseCRF (DeepLab): fully connected CRF mean-field inference on the permutohedral lattice."""
import math

import torch

from segaware_caffe.kernels.dense_crf import (FLT_MIN, PottsKernel, dense_crf_inference,
                                              pixel_features)

from .. import limits
from ..layer import CaffeLayer, register_layer


@register_layer("DenseCRF")
class DenseCRF(CaffeLayer):
    """Bottoms: DCNN scores (N, C, H, W), dims (N, 2, 1, 1) = the valid (h, w) of each image,
    optionally the image (N, 3, H, W) in the 0..255 range of the features' rgb_std.

    Per image, the region is the whole blob when dims >= (H, W) in both axes, else dims (int()
    truncation). Mean-field with one Gaussian Potts kernel per pos_w entry on (x, y) / pos_xy_std
    and, with an image, one per bi_w entry on (x / bi_xy_std, y / bi_xy_std, rgb / bi_rgb_std);
    max_iter steps from softmax(scores). Top: the probabilities (output_probability, default) or
    log(max(p, FLT_MIN)) over the region, 0 elsewhere. Computed in float32 like the original.

    Kept from the original: the bilateral features of every image are those of image 0 of the
    batch (it reads the image blob without an image offset). Done the evident way: with no image
    bottom the original crashes (it checks the image blob's batch size regardless); here the
    positional kernels alone run. Forward only: the original's Backward is empty.
    """
    BOTTOMS = (2, 3)
    HAS_BACKWARD = False

    def __init__(self, *, max_iter=10, pos=(), bilateral=(), output_probability=True,
                 where="DenseCRF"):
        super().__init__()
        self.max_iter = max_iter
        self.pos = tuple((float(w), float(s)) for w, s in pos)                 # (w, xy_std)
        self.bilateral = tuple((float(w), float(s), float(r)) for w, s, r in bilateral)
        self.output_probability = output_probability
        self.where = where

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.dense_crf_param
        if len(p.pos_w) != len(p.pos_xy_std):
            raise ctx.error(f"dense_crf_param: pos_w and pos_xy_std must have the same number of "
                            f"values, got {len(p.pos_w)} and {len(p.pos_xy_std)}")
        if not len(p.bi_w) == len(p.bi_xy_std) == len(p.bi_rgb_std):
            raise ctx.error(f"dense_crf_param: bi_w, bi_xy_std and bi_rgb_std must have the same number "
                            f"of values, got {len(p.bi_w)}, {len(p.bi_xy_std)} and {len(p.bi_rgb_std)}")
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std"):
            if any(v == 0 for v in getattr(p, name)):
                raise ctx.error(f"dense_crf_param.{name} must be non-zero (features are divided by it), "
                                f"got {list(getattr(p, name))}")
        shapes = [tuple(s) for s in ctx.bottom_shapes]
        scores = shapes[0]
        if len(scores) != 4:
            raise ctx.error(f"bottom 0 (the scores) must be (N, C, H, W), got {scores}")
        dims = shapes[1]
        if not dims or dims[0] != scores[0] or (scores[0] and math.prod(dims) // dims[0] < 2):
            raise ctx.error(f"bottom 1 (the valid sizes) must hold (h, w) per image, (N, 2, 1, 1) "
                            f"with N = {scores[0]}, got {dims}")
        if len(shapes) == 3:
            image = shapes[2]
            if len(image) != 4 or image[0] != scores[0] or image[1] != 3 or image[2:] != scores[2:]:
                raise ctx.error(f"bottom 2 (the image) must be (N, 3, H, W) = {(scores[0], 3, *scores[2:])}, "
                                f"got {image}")
            if not len(p.bi_w):
                raise ctx.error("dense_crf_param: an image bottom is given but no bilateral kernel "
                                "(bi_w, bi_xy_std, bi_rgb_std)")
        elif len(p.bi_w):
            ctx.warn("dense_crf_param: the bilateral kernels (bi_w ...) need an image bottom; without "
                     "one only the positional kernels run")
        limits.check(p.max_iter, "layer_iterations", "dense_crf_param.max_iter",
                     f"{ctx.name} ({ctx.type})")
        return cls(max_iter=int(p.max_iter), pos=list(zip(p.pos_w, p.pos_xy_std)),
                   bilateral=list(zip(p.bi_w, p.bi_xy_std, p.bi_rgb_std)) if len(shapes) == 3 else (),
                   output_probability=bool(p.output_probability), where=f"{ctx.name} ({ctx.type})")

    def _region(self, valid, image, height, width):
        rows, cols = (int(v) for v in valid[:2])
        if height <= rows and width <= cols:
            return height, width
        if not (0 <= rows <= height and 0 <= cols <= width):
            raise ValueError(f"{self.where}: image {image}: valid size ({rows}, {cols}) must be within "
                             f"the blob's ({height}, {width}) or cover it in both axes")
        return rows, cols

    def forward(self, *bottoms):
        with torch.no_grad():       # the original has no backward: keep no graph
            return self._infer(*bottoms)

    def _infer(self, scores, dims, image=None):
        n, channels, height, width = scores.shape
        top = torch.zeros(n, channels, height, width, dtype=torch.float32, device=scores.device)
        # the kernels depend only on the region's size (positions, and image 0's colours): the
        # images of one size share their lattices and run as one batch
        groups = {}
        for index, valid in enumerate(dims.reshape(n, -1)[:, :2].tolist() if n else []):
            groups.setdefault(self._region(valid, index, height, width), []).append(index)
        for (rows, cols), indices in groups.items():
            if rows * cols == 0:
                continue
            kernels = [PottsKernel(pixel_features(rows, cols, std, device=scores.device), w)
                       for w, std in self.pos]
            if image is not None:
                # image 0 for every item of the batch, as the original reads it
                first = image[0, :, :rows, :cols]
                kernels += [PottsKernel(pixel_features(rows, cols, std, first, rgb, device=scores.device), w)
                            for w, std, rgb in self.bilateral]
            chosen = torch.tensor(indices, device=scores.device)
            region = scores[chosen, :, :rows, :cols].to(torch.float32).permute(0, 2, 3, 1)
            q = dense_crf_inference(region.reshape(len(indices), -1, channels), kernels,
                                    self.max_iter)
            if not self.output_probability:
                q = torch.log(torch.clamp(q, min=FLT_MIN).double()).to(torch.float32)
            top[chosen, :, :rows, :cols] = q.reshape(-1, rows, cols, channels).permute(0, 3, 1, 2)
        return top.to(scores.dtype)

    def output_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def extra_repr(self):
        return (f"max_iter={self.max_iter}, pos={list(self.pos)}, bilateral={list(self.bilateral)}, "
                f"output_probability={self.output_probability}")
