"""CuPy plumbing shared by the CUDA paths of kernels/*: lazy import, compile cache, launch.

Kernel sources are module-level strings of ``extern "C" __global__`` functions written with the
placeholder ``scalar_t`` for the element type; only the dtype is templated (sizes are int
arguments, so a new image size never recompiles). Every kernel uses a grid-stride loop over a
``long long`` element count, so one launch helper serves them all.
"""
import functools

import numpy as np
import torch

BLOCK_SIZE = 512
MAX_BLOCKS = 65535

_C_TYPES = {torch.float32: "float", torch.float64: "double"}
_NUMPY_TYPES = {torch.float32: np.float32, torch.float64: np.float64}


def cupy_module():
    """Import CuPy on first use, so CPU-only installs never need it."""
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError("segaware-caffe kernels on CUDA tensors need CuPy: "
                           "pip install segaware-caffe[cuda]") from error
    return cupy


def c_type(dtype):
    try:
        return _C_TYPES[dtype]
    except KeyError:
        raise TypeError(f"CUDA kernels support float32 and float64, got {dtype}") from None


@functools.lru_cache(maxsize=None)
def _compiled_kernel(name, source, scalar_type, device_index):
    cupy = cupy_module()
    # `scalar_t` is a typedef, so the source stays valid C++ for every dtype
    full_source = f"typedef {scalar_type} scalar_t;\n{source}"
    with cupy.cuda.Device(device_index):
        kernel = cupy.RawKernel(full_source, name)
        kernel.compile()
    return kernel


def grid_size(total):
    return max(1, min((total + BLOCK_SIZE - 1) // BLOCK_SIZE, MAX_BLOCKS))


def launch(name, source, total, args, *, like):
    """Run kernel `name` of `source` over `total` elements. `args` after the element count:
    tensors (passed as device pointers; must be contiguous and on like's device), Python ints
    (int32) and Python floats (in like's dtype). `like` picks dtype and device."""
    if total == 0:
        return
    cupy = cupy_module()
    device_index = (like.device.index if like.device.index is not None
                    else torch.cuda.current_device())
    kernel = _compiled_kernel(name, source, c_type(like.dtype), device_index)
    scalar = _NUMPY_TYPES[like.dtype]
    launch_args = [np.int64(total)]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if arg.device != like.device or not arg.is_contiguous():
                raise ValueError(f"{name}: tensor arguments must be contiguous and on "
                                 f"{like.device}, got one on {arg.device} "
                                 f"(contiguous={arg.is_contiguous()})")
            launch_args.append(arg.data_ptr())
        elif isinstance(arg, bool) or isinstance(arg, int):
            launch_args.append(np.int32(arg))
        elif isinstance(arg, float):
            launch_args.append(scalar(arg))
        else:
            raise TypeError(f"{name}: unsupported kernel argument type {type(arg).__name__}")
    # the stream is looked up at every call: callers may switch streams between launches
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device_index).cuda_stream)
    with cupy.cuda.Device(device_index), stream:
        kernel((grid_size(total),), (BLOCK_SIZE,), tuple(launch_args))


# Grid-stride loop header shared by every kernel (`total` is the first kernel argument).
GRID_STRIDE_LOOP = """
#define GRID_STRIDE_LOOP(index, total) \\
  for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < (total); \\
       index += (long long)blockDim.x * gridDim.x)
"""

# For kernels writing an im2col-shaped (N, taps, out_h, out_w) result (im2dist, im2parity): the
# flat output index -> image n, tap k = (i, j), output pixel (ho, wo), the window centre (ch, cw)
# and the tap's input pixel (nh, nw). Expects the geometry arguments under their usual names.
WINDOW_TAP = r"""
#define WINDOW_TAP(index) \
    const int wo = index % out_w; \
    const int ho = (index / out_w) % out_h; \
    const int k = (index / ((long long)out_w * out_h)) % taps; \
    const long long n = index / ((long long)out_w * out_h * taps); \
    const int i = k / kernel_w, j = k % kernel_w; \
    const int centre_i = kernel_h / 2, centre_j = kernel_w / 2; \
    const int ch = ho * stride_h - pad_h + centre_i * dilation_h; \
    const int cw = wo * stride_w - pad_w + centre_j * dilation_w; \
    const int nh = ho * stride_h - pad_h + i * dilation_h; \
    const int nw = wo * stride_w - pad_w + j * dilation_w;
"""
