"""Data input for the Caffe data layers: list files, image reading, Caffe's DataTransformer, and
DataLoader plumbing (see `base.ListDataLayer`)."""
from .images import DataError, DataSetupError, read_image, resize_bilinear, resize_nearest
from .loader import WORKERS_ENV, default_num_workers
from .transforms import CropMirrorTransform, JointTransform

__all__ = ["CropMirrorTransform", "DataError", "DataSetupError", "JointTransform", "WORKERS_ENV",
           "default_num_workers", "read_image", "resize_bilinear", "resize_nearest"]
