"""Helpers shared by the segmentation-aware op tests: build one layer from prototxt text, compare
with golden numbers at the golden/README tolerance."""
import itertools

import numpy as np
import torch

from segaware_caffe.caffe_proto import read_net
from segaware_caffe.kernels import BIG
from segaware_caffe import BuildContext
from segaware_caffe.layer import layer_class


def build_layer(text_or_param, bottom_shapes, phase="TEST"):
    """A layer from `layer { ... }` body text (or a LayerParameter), set up for bottom_shapes."""
    layer_param = (read_net(f"layer {{ {text_or_param} }}").layer[0]
                   if isinstance(text_or_param, str) else text_or_param)
    ctx = BuildContext(name=layer_param.name, type=layer_param.type, phase=phase,
                       bottom_shapes=[tuple(s) for s in bottom_shapes],
                       bottom_names=list(layer_param.bottom), top_names=list(layer_param.top))
    return layer_class(layer_param.type, layer_param.name).from_proto(layer_param, ctx)


def assert_golden_close(got, ref, what):
    """|got - ref| <= 1e-4 |ref| + 1e-5 max|ref| elementwise; removed taps (FLT_MAX/100) must
    match exactly and are left out of max|ref|. Returns the max error relative to max|ref|."""
    got = got.detach().double().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    big = ref == np.float64(np.float32(BIG))
    assert np.array_equal(got[big], ref[big]), f"{what}: removed taps (FLT_MAX/100) differ"
    kept = np.where(big, 0.0, ref)
    scale = np.abs(kept).max() if kept.size else 0.0
    err = np.where(big, 0.0, np.abs(got - ref))
    assert (err <= 1e-4 * np.abs(kept) + 1e-5 * scale).all(), \
        f"{what}: max abs error {err.max():.3g}, max|ref| {scale:.3g}"
    return err.max() / scale if scale else err.max()


def window_taps(shape, geometry):
    """For the pure-Python references, straight from the spec: every output element (n, tap k,
    ho, wo) of an im2col-shaped result with its patch centre (ch, cw), the tap's pixel (nh, nw),
    whether each lies inside the image, and whether the tap is the centre one."""
    batch, _, height, width = shape
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = (geometry.kernel, geometry.pad, geometry.stride,
                                              geometry.dilation)
    out_h, out_w = geometry.output_size(height, width)
    inside = lambda h, w: 0 <= h < height and 0 <= w < width
    for n, i, j, ho, wo in itertools.product(range(batch), range(kh), range(kw), range(out_h),
                                             range(out_w)):
        ch, cw = ho * sh - ph + (kh // 2) * dh, wo * sw - pw + (kw // 2) * dw
        nh, nw = ho * sh - ph + i * dh, wo * sw - pw + j * dw
        yield (n, i * kw + j, ho, wo, (ch, cw), (nh, nw), inside(ch, cw), inside(nh, nw),
               (i, j) == (kh // 2, kw // 2))
