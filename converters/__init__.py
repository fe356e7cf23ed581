"""Conversions of Caffe nets and weights: caffemodel <-> safetensors/.pt (`caffemodel`), standalone
PyTorch module source (`python_export`, one emitter per layer type in `emitters`) and ONNX
(`onnx_export`)."""
from .caffemodel import (caffemodel_to_tensors, convert_caffemodel, convert_to_caffemodel,
                         load_tensors, save_tensors, tensors_to_caffemodel)

__all__ = ["caffemodel_to_tensors", "convert_caffemodel", "convert_to_caffemodel", "load_tensors",
           "save_tensors", "tensors_to_caffemodel"]
