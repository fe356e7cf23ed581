"""Recognise the released segmentation-aware convolution pattern and run it fused (issue #4).

Pattern (config/vgg): Im2col(x) * Tile(Exp(AbsVal(Scale(Im2dist(e))))) -> Eltwise PROD ->
Convolution(bottom_is_im2col). Until the fused op lands, nets run every layer as written.
"""


def fuse_segaware_convs(net):
    """Rewrite matching chains of `net` in place; returns the names of the fused convolutions."""
    return []
