"""Compiled loops for the CPU paths: C sources (kernels/cpu/*.c) built on first use with the
system C compiler and called through ctypes.

Why: some CPU steps are plain loops that torch can only express as several strided passes (the
masked columns of the fused convolution are 9 broadcast products per band, bound by memory at a
few GB/s); one C loop does them at cache speed. Only such loops live here; products stay torch
matmuls (BLAS) or oneDNN convolutions, except a matrix-vector product bound by reading its
matrix (linear.c: the few-row InnerProduct, split over the threads). Each loop computes what the torch code beside it computes, element for element
(where a source says otherwise, it says why; sums over channels may run in another order than
torch's reductions, within float rounding), so a machine without a compiler (or
`ENABLED = False`, or SEGAWARE_NATIVE_CPU=0) runs the torch code with the same numbers, slower.

Each source is compiled once per element type, with `scalar_t`, SCALAR_MIN (its smallest normal
number), SCALAR_FMA (its fused multiply-add) and SCALAR_ABS defined in front, then
kernels/cpu/common.h (what the sources share), for this CPU
(-march=native, retried without it) into a cache folder: $SEGAWARE_CACHE, else
$XDG_CACHE_HOME/segaware-caffe, else ~/.cache/segaware-caffe. A library's name carries a hash of
its source, the compiler, the flags and the CPU, so a changed source or another machine sharing
the folder builds its own; a library is written under a temporary name and renamed, so processes
compiling at once never load a partial file. The loops split their work with OpenMP (-fopenmp):
the library then binds to the libgomp torch has loaded, so they run on torch's thread pool rather
than beside its spinning threads; where -fopenmp fails they run on one thread.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

ENABLED = os.environ.get("SEGAWARE_NATIVE_CPU", "1").strip() != "0"

SOURCE_DIR = Path(__file__).resolve().parent / "cpu"

_C_TYPES = {torch.float32: "float", torch.float64: "double"}

# every exported function's arguments: "p" a pointer, "l" a C long, "d" a C double
SIGNATURES = {
    "masked_conv.c": {
        "masked_columns": "ll" + "ppp" + "l" * 15,
        "masked_columns_grad_x": "ll" + "ppp" + "l" * 15,
        "masked_columns_grad_mask": "ll" + "ppp" + "l" * 15,
        "masked_pixel_columns": "ll" + "ppp" + "l" * 15,
        "masked_pixel_columns_grad_x": "ll" + "ppp" + "l" * 15,
        "masked_pixel_columns_grad_mask": "ll" + "ppp" + "l" * 15,
    },
    "meanfield.c": {
        "message_forward": "ll" + "ppp" + "l" * 12,
    },
    "im2dist.c": {
        "distance_taps": "ll" + "ppppp" + "l" * 7,
        "distance_backward": "ll" + "ppp" + "l" * 14,
    },
    "layout.c": {
        "rows_to_planes": "ll" + "ppp" + "ll",
        "planes_to_rows": "ll" + "pp" + "ll",
    },
    "interp.c": {
        "bilinear": "ll" + "pp" + "l" * 9,
        "bilinear_backward": "ll" + "pp" + "l" * 6,
    },
    "linear.c": {
        "linear_rows": "ll" + "pppp" + "lll" + "d",
    },
    "winograd.c": {
        "winograd_input": "ll" + "pp" + "l" * 8,
        "winograd_output": "ll" + "ppp" + "l" * 8 + "d",
    },
    "pooling.c": {
        "max_pool": "ll" + "pp" + "l" * 11,
        "avg_pool": "ll" + "pp" + "l" * 11,
        "max_pool_indices": "ll" + "ppp" + "l" * 10,
        "max_pool_indices_backward": "ll" + "ppp" + "l" * 4,
    },
}

# functions that return 0, or -1 where they could not allocate their scratch memory
RETURNS_STATUS = {"max_pool", "avg_pool", "max_pool_indices", "bilinear", "bilinear_backward", "distance_backward"}

_FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3",))
# no contraction of a * b + c into one rounding unless a source asks for it (SCALAR_FMA)
_BASE_FLAGS = ("-std=c99", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=off")

# why the last build failed, for `status()`
_failures = {}
_lock = threading.Lock()


def cache_dir():
    root = os.environ.get("SEGAWARE_CACHE")
    if root:
        return Path(root) / "cpu"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "segaware-caffe" / "cpu"


def _compiler():
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=1)
def _cpu_signature():
    """What makes -march=native code of one machine wrong on another."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
    except OSError:
        pass
    return text


def _build(source_name, dtype):
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    scalar = _C_TYPES[dtype]
    code = (f"#include <float.h>\ntypedef {scalar} scalar_t;\n"
            f"#define SCALAR_MIN {'FLT_MIN' if scalar == 'float' else 'DBL_MIN'}\n"
            f"#define SCALAR_FMA {'fmaf' if scalar == 'float' else 'fma'}\n"
            f"#define SCALAR_ABS {'fabsf' if scalar == 'float' else 'fabs'}\n"
            + (SOURCE_DIR / "common.h").read_text() + (SOURCE_DIR / source_name).read_text())
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join((code, compiler, *flags, *_BASE_FLAGS,
                                        _cpu_signature())).encode()).hexdigest()[:20]
        folder = cache_dir()
        target = folder / f"{Path(source_name).stem}-{_C_TYPES[dtype]}-{key}.so"
        if not target.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as work:
                    c_file = Path(work) / "source.c"
                    c_file.write_text(code)
                    built = Path(work) / "library.so"
                    result = subprocess.run([compiler, *flags, *_BASE_FLAGS, str(c_file), "-o",
                                             str(built), "-lm"], capture_output=True, text=True)
                    if result.returncode != 0:
                        errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-500:]}")
                        continue
                    os.replace(built, target)
            except OSError as error:
                return None, f"cannot write the compiled loops to {folder}: {error}"
        try:
            return ctypes.CDLL(str(target)), None
        except OSError as error:
            errors.append(f"loading {target}: {error}")
    return None, "; ".join(errors)


@functools.lru_cache(maxsize=None)
def _library(source_name, dtype):
    library, failure = _build(source_name, dtype)
    if library is None:
        _failures[(source_name, dtype)] = failure
        return None
    types = {"p": ctypes.c_void_p, "l": ctypes.c_long, "d": ctypes.c_double}
    for name, signature in SIGNATURES[source_name].items():
        function = getattr(library, name)
        function.argtypes = [types[kind] for kind in signature]
        function.restype = ctypes.c_int if name in RETURNS_STATUS else None
    return library


def function(source_name, name, dtype):
    """The compiled `name` of kernels/cpu/`source_name` for `dtype`, or None where compiled loops
    are off, the dtype has none, or the build failed (the caller then runs its torch code)."""
    if not ENABLED or dtype not in _C_TYPES:
        return None
    with _lock:
        library = _library(source_name, dtype)
    return None if library is None else getattr(library, name)


def status():
    """{(source, dtype): why its build failed} for the builds tried so far (empty: all fine)."""
    return dict(_failures)


def plain(*tensors):
    """Whether the compiled loops may read and write these: plain CPU tensors with storage (not
    fake, meta or subclassed tensors, e.g. under shape inference or torch.compile's tracing,
    whose data pointers are no memory), outside torch.jit's tracing (a trace, as the ONNX
    export records it, sees torch's operations but not what a loop computes)."""
    return not torch.jit.is_tracing() and \
        all(type(t) in _PLAIN and t.device.type == "cpu" for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def threads():
    """The thread count a loop runs on: torch's (the calling thread's setting)."""
    return torch.get_num_threads()
