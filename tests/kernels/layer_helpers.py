"""Helpers shared by the segmentation-aware op tests: build one layer from prototxt text, compare
with golden numbers at the golden tolerance (tests/tolerances.py)."""
import itertools

from tests.layers.helpers import build as build_layer
from tests.tolerances import assert_close

__all__ = ["assert_golden_close", "build_layer", "window_taps"]


assert_golden_close = assert_close    # the golden tolerance of tests/tolerances.py


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
