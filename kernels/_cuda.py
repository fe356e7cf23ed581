"""CuPy plumbing shared by the CUDA paths of kernels/*: lazy import, sources, compile cache,
argument checks, launch on the current torch stream.

Kernel sources live in kernels/cuda/*.cu (common.cuh first); each is compiled once per element
type with `scalar_t` (storage) and `acc_t` (arithmetic) typedef'd in front, and per set of
`#define`s where a source has variants. Sizes are kernel arguments, so a new image size never
recompiles. `launch` checks every argument before anything runs: tensors must be contiguous, on
the launching tensor's device and of the dtype the kernel was compiled for (or the dtype given
with `Typed`), ints must fit the C int they become.

`_run` is the single place that talks to CuPy; the CPU emulation in tests/kernels replaces it.
"""
import functools
import math
from pathlib import Path

import numpy as np
import torch

BLOCK_SIZE = 256
MAX_GRID_X = 1 << 16        # grid-stride loops cover the rest; keeps launches cheap
MAX_GRID_Y = 65535
INT32_MAX = (1 << 31) - 1

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"

# storage type, arithmetic type
_C_TYPES = {
    torch.float32: ("float", "float"),
    torch.float64: ("double", "double"),
    torch.float16: ("f16_t", "float"),
    torch.bfloat16: ("bf16_t", "float"),
}


def cupy_module():
    """Import CuPy on first use, so CPU-only installs never need it."""
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError("segaware-caffe kernels on CUDA tensors need CuPy: pip install "
                           "segaware-caffe[cuda12] (CUDA 12 torch builds) or [cuda13]") from error
    return cupy


def c_types(dtype):
    try:
        return _C_TYPES[dtype]
    except KeyError:
        raise TypeError(f"CUDA kernels support float16, bfloat16, float32 and float64, got "
                        f"{dtype}") from None


@functools.lru_cache(maxsize=None)
def source(*names):
    """common.cuh followed by the named files of kernels/cuda."""
    parts = ["common.cuh", *names]
    return "\n".join((SOURCE_DIR / name).read_text() for name in parts)


@functools.lru_cache(maxsize=None)
def kernel_code(dtype, sources, defines=()):
    """The complete source of `sources` (a tuple of names) for `dtype` and `defines`; one string
    object per combination, so the compile cache finds it by identity."""
    return preamble(dtype, defines) + source(*sources)


def preamble(dtype, defines=()):
    """The lines compiled in front of a source for `dtype` and `defines` ((name, value) pairs)."""
    storage, arithmetic = c_types(dtype)
    lines = [f"#define {name} {value}" for name, value in defines]
    lines += [f"#define SEGAWARE_SCALAR {storage}", f"#define SEGAWARE_ACC {arithmetic}"]
    return "\n".join(lines) + "\n"


class Typed:
    """A tensor argument of another dtype than the kernel's scalar_t (e.g. a float32 mask next
    to bfloat16 activations)."""
    __slots__ = ("tensor", "dtype")

    def __init__(self, tensor, dtype):
        self.tensor, self.dtype = tensor, dtype


class Shifted:
    """A tensor seen as if it began `elements` elements earlier (its pointer moved back), for
    launches whose first image or row is not 0: the kernel then indexes the real buffer with the
    large offsets it would use deep inside a huge batch. `dtype`: as for Typed."""
    __slots__ = ("tensor", "elements", "dtype")

    def __init__(self, tensor, elements, dtype=None):
        self.tensor, self.elements, self.dtype = tensor, int(elements), dtype


def at_image(tensor, images, dtype=None):
    """`tensor` (first axis: images) as the argument of a launch whose first image is number
    `images`."""
    if images:
        return Shifted(tensor, images * math.prod(tensor.shape[1:]), dtype)
    return Typed(tensor, dtype) if dtype is not None else tensor


class Int64:
    """An int argument the kernel declares as long long."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = int(value)


def convert_args(name, args, like):
    """Check `args` and turn them into (kind, value) pairs: ("ptr", address), ("i32", int),
    ("i64", int), ("f32" | "f64", float). Floats become the kernel's acc_t."""
    float_kind = "f64" if like.dtype == torch.float64 else "f32"
    converted = []
    for position, arg in enumerate(args):
        expected, shift = like.dtype, 0
        if isinstance(arg, Shifted):
            shift = -arg.elements * arg.tensor.element_size()
            expected = arg.dtype or expected
            arg = arg.tensor
        elif isinstance(arg, Typed):
            arg, expected = arg.tensor, arg.dtype
        if isinstance(arg, torch.Tensor):
            problems = []
            if arg.device != like.device:
                problems.append(f"on {arg.device} (expected {like.device})")
            if arg.dtype != expected:
                problems.append(f"of dtype {arg.dtype} (expected {expected})")
            if not arg.is_contiguous():
                problems.append("not contiguous")
            if problems:
                raise ValueError(f"{name}: tensor argument {position} is {', '.join(problems)}")
            converted.append(("ptr", arg.data_ptr() + shift))
        elif isinstance(arg, Int64):
            converted.append(("i64", arg.value))
        elif isinstance(arg, bool) or isinstance(arg, (int, np.integer)):
            value = int(arg)
            if not -INT32_MAX - 1 <= value <= INT32_MAX:
                raise OverflowError(f"{name}: int argument {position} = {value} does not fit a "
                                    f"32-bit int")
            converted.append(("i32", value))
        elif isinstance(arg, float):
            converted.append((float_kind, arg))
        else:
            raise TypeError(f"{name}: unsupported kernel argument {position} of type "
                            f"{type(arg).__name__}")
    return converted


def device_index(tensor):
    return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def compute_capability(index):
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def multiprocessors(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _function(name, code, index):
    cupy = cupy_module()
    with cupy.cuda.Device(index):
        module = cupy.RawModule(code=code, options=("--std=c++14",))
        return module.get_function(name)


class _StreamHandle:
    """A raw CUDA stream as the CUDA stream protocol presents it (version 0, handle)."""
    __slots__ = ("handle",)

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


_STREAMS = {}


def cupy_stream(cupy, index):
    """CuPy's view of torch's current stream on device `index`, looked up at every launch (the
    caller may switch streams between launches) and cached per raw handle. CuPy >= 14 takes it
    through the CUDA stream protocol (Stream.from_external); CuPy 13 through ExternalStream."""
    handle = torch.cuda.current_stream(index).cuda_stream
    key = (index, handle)
    stream = _STREAMS.get(key)
    if stream is None:
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            with cupy.cuda.Device(index):
                stream = from_external(_StreamHandle(handle))
        else:
            stream = cupy.cuda.ExternalStream(handle, index)
        _STREAMS[key] = stream
    return stream


def _run(name, code, grid, block, converted, like, shared_mem=0):
    """Launch `name` of `code` on like's device and torch's current stream there."""
    cupy = cupy_module()
    index = device_index(like)
    function = _function(name, code, index)
    scalars = {"ptr": np.uintp, "i32": np.int32, "i64": np.int64, "f32": np.float32,
               "f64": np.float64}
    values = tuple(scalars[kind](value) for kind, value in converted)
    with cupy.cuda.Device(index), cupy_stream(cupy, index):
        function(grid, block, values, shared_mem=shared_mem)


def launch(name, code, *, grid, block, args, like, shared_mem=0):
    """Run kernel `name` of the complete source `code` (preamble included)."""
    converted = convert_args(name, args, like)
    if any(g <= 0 for g in grid):
        return
    _run(name, code, tuple(int(g) for g in grid), tuple(int(b) for b in block), converted, like,
         shared_mem)


def _check_int32(name, what, value):
    if value > INT32_MAX:
        raise OverflowError(f"{name}: {what} = {value} exceeds the 32-bit range the kernel "
                            f"indexes it with")


def launch_rows(name, sources, rows, plane, args, *, like, row_begin=0, defines=()):
    """A row-plane kernel (see common.cuh) over rows [row_begin, row_begin + rows) of `plane`
    pixels each; `args` follow (row_begin, row_end, plane)."""
    _check_int32(name, "the row count", row_begin + rows)
    _check_int32(name, "the plane size", plane)
    if rows <= 0 or plane <= 0:
        return
    grid = (min(-(-plane // BLOCK_SIZE), MAX_GRID_X), min(rows, MAX_GRID_Y), 1)
    launch(name, kernel_code(like.dtype, tuple(sources), tuple(defines)), grid=grid,
           block=(BLOCK_SIZE, 1, 1), args=(row_begin, row_begin + rows, plane, *args), like=like)


def launch_tap_planes(name, sources, x, geometry, args, images=0):
    """The (N, taps, Ho, Wo) output of a row-plane kernel with one row per image and tap of
    `geometry` over the 4-D `x`, called with (x, out, GEOMETRY_PARAMS, *args). `images` > 0
    numbers the batch's images from there (tests: offsets beyond 2^31 elements)."""
    batch, channels, height, width = x.shape
    out_size = geometry.output_size(height, width)
    out = x.new_empty((batch, geometry.taps) + out_size)
    launch_rows(name, sources, batch * geometry.taps, out_size[0] * out_size[1],
                (at_image(x, images), at_image(out, images),
                 *geometry_args(geometry, channels, height, width, out_size), *args),
                like=x, row_begin=images * geometry.taps)
    return out


def launch_flat(name, sources, total, args, *, like, begin=0, defines=()):
    """A flat kernel over [begin, begin + total) (64-bit indices); `args` follow (begin, end)."""
    if total <= 0:
        return
    grid = (min(-(-total // BLOCK_SIZE), MAX_GRID_X), 1, 1)
    launch(name, kernel_code(like.dtype, tuple(sources), tuple(defines)), grid=grid,
           block=(BLOCK_SIZE, 1, 1), args=(Int64(begin), Int64(begin + total), *args), like=like)


def geometry_args(geometry, channels, height, width, out_size):
    """The GEOMETRY_PARAMS of common.cuh, in their order."""
    return (channels, height, width, *out_size, *geometry.kernel, *geometry.pad,
            *geometry.stride, *geometry.dilation)
