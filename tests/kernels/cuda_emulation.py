"""Run the CuPy kernel sources of kernels/* on the CPU: each source is compiled as C++ (double)
with a one-thread grid, so every grid-stride loop walks all its indices. Patched in place of
kernels._cuda.launch, it checks the CUDA kernels' index maths against the CPU path on machines
without a GPU."""
import atexit
import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from segaware_caffe.kernels import _cuda

_PRELUDE = """#include <cmath>
using std::fabs; using std::trunc;
#define __global__
struct Dim { unsigned x; };
extern "C" { Dim blockIdx = {0}, blockDim = {1}, threadIdx = {0}, gridDim = {1}; }
typedef double scalar_t;
"""


_LIBRARIES = {}   # kernel source -> compiled library, once per test session


def _library_for(source, compiler):
    if source not in _LIBRARIES:
        workdir = Path(tempfile.mkdtemp(prefix="segaware-cuda-emulation-"))
        atexit.register(shutil.rmtree, workdir, True)    # nothing is left behind in /tmp
        cpp, shared_object = workdir / "kernels.cpp", workdir / "kernels.so"
        cpp.write_text(_PRELUDE + source)
        subprocess.run([compiler, "-O1", "-shared", "-fPIC", str(cpp), "-o", str(shared_object)],
                       check=True)
        _LIBRARIES[source] = ctypes.CDLL(str(shared_object))
    return _LIBRARIES[source]


def emulate_cuda_launch(monkeypatch):
    """Replace kernels._cuda.launch by a CPU run of the same kernel source (float64 only)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("needs a C++ compiler to emulate the CUDA kernels")

    def launch(name, source, total, args, *, like):
        values = [ctypes.c_longlong(total)]
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if not arg.is_contiguous() or arg.dtype != torch.float64:
                    raise AssertionError(f"{name}: emulated kernels take contiguous float64 "
                                         f"tensors")
                values.append(ctypes.c_void_p(arg.data_ptr()))
            elif isinstance(arg, float):
                values.append(ctypes.c_double(arg))
            else:
                values.append(ctypes.c_int(int(arg)))
        getattr(_library_for(source, compiler), name)(*values)

    monkeypatch.setattr(_cuda, "launch", launch)
