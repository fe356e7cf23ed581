from setuptools import find_packages, setup

SUBPACKAGES = ("caffe_proto", "kernels", "converters", "tools")


def packages():
    """segaware_caffe, its subpackages, and the four folders above under segaware_caffe."""
    found = ["segaware_caffe"] + find_packages(include=["segaware_caffe.*"])
    for name in SUBPACKAGES:
        found += ["segaware_caffe." + p for p in find_packages(include=[name, name + ".*"])]
    return found


setup(
    name="segaware-caffe",
    version="0.1.0",
    description="Segmentation-aware Caffe (and BVLC Caffe) models on PyTorch, with the original's numbers",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/, converters/, tools/ and caffe_proto/ are folders of the repository but install as
    # segaware_caffe.kernels, ... so that no generic top-level name lands in site-packages
    packages=packages(),
    package_dir={"segaware_caffe." + name: name for name in SUBPACKAGES},
    package_data={"segaware_caffe.caffe_proto": ["caffe.proto"], "segaware_caffe": ["assets/*"],
                  "segaware_caffe.kernels": ["cuda/*.cu", "cuda/*.cuh", "cpu/*.c", "cpu/*.h"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.23",
        "protobuf>=4.21",      # caffe_pb2.py builds its descriptors at import (no gencode pin)
        "pillow>=9",
        "scipy>=1.9",          # MatWrite (.mat files)
        "safetensors>=0.4",
    ],
    extras_require={
        # CuPy for the CUDA kernels, matching the CUDA major version of the torch build
        # (torch.version.cuda); CuPy 13 and 14 both work
        "cuda12": ["cupy-cuda12x>=13"],
        "cuda13": ["cupy-cuda13x>=14"],
        "cuda": ["cupy-cuda13x>=14"],   # the name of earlier releases: same as cuda13
        # HDF5Data/HDF5Output (h5py), Data on LMDB (lmdb) and LevelDB (plyvel)
        "data": ["h5py>=3", "lmdb>=1", "plyvel>=1.3"],
        # opencv: the SSD tests compare with OpenCV's Caffe importer, and data tests check
        # OpenCV-equivalent resizing bit for bit
        "test": ["pytest>=7", "pytest-xdist>=3", "grpcio-tools>=1.70", "onnx>=1.15", "onnxruntime>=1.17",
                 "h5py>=3", "lmdb>=1", "plyvel>=1.3", "opencv-python-headless<5",
                 "hypothesis>=6", "matplotlib>=3.5"],
        "bench": ["opencv-python-headless<5"],
        # `segaware-caffe plot LOG` draws training curves with matplotlib (--csv works without)
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["segaware-caffe=segaware_caffe.tools.cli:main"]},
)
