"""Segmentation-aware ops as torch.autograd.Functions: vectorised torch on CPU, CuPy on CUDA.

Each module holds one op: im2dist, im2parity, dist_loss, masked_conv (the fused segmentation-aware
convolution), norm_conv and meanfield (NormConv / NormConvMeanfield; import those from their
modules: a package attribute `norm_conv` would hide the module of that name).
"""
from .dist_loss import dist_loss
from .im2dist import BIG, PatchGeometry, im2dist, tap_offsets
from .im2parity import im2parity
from .masked_conv import masked_conv2d, segaware_mask

__all__ = ["BIG", "PatchGeometry", "dist_loss", "im2dist", "im2parity", "masked_conv2d",
           "segaware_mask", "tap_offsets"]
