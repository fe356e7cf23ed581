"""Segmentation-aware ops as torch custom ops (torch.ops.segaware.*): vectorised torch on CPU
(with compiled loops, _native.py, where torch would need many passes), CuPy CUDA kernels on GPU,
each with its backward op, so torch.compile sees them whole.

Each module holds one op: im2dist, im2parity, dist_loss, masked_conv (the fused segmentation-aware
convolution), norm_conv and meanfield (NormConv / NormConvMeanfield; import those from their
modules: a package attribute `norm_conv` would hide the module of that name). The convolution
geometry they share (and the layers use) is `geometry.ConvGeometry`.
"""
from .dist_loss import dist_loss
from .geometry import ConvGeometry, tap_offsets
from .im2dist import BIG, im2dist
from .im2parity import im2parity
from .masked_conv import masked_conv2d, segaware_mask

__all__ = ["BIG", "ConvGeometry", "dist_loss", "im2dist", "im2parity", "masked_conv2d",
           "segaware_mask", "tap_offsets"]
