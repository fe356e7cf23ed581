"""Segmentation-aware ops as torch.autograd.Functions: vectorised torch on CPU, CuPy on CUDA."""
from .im2dist import BIG, PatchGeometry, im2dist, tap_offsets

__all__ = ["BIG", "PatchGeometry", "im2dist", "tap_offsets"]
