"""Run the CUDA kernel sources of kernels/cuda on the CPU, as CUDA would run them.

Each source is compiled as C++ together with a small runtime that executes a launch block by
block, every thread of a block as its own coroutine (ucontext) on one OS thread. A thread runs
until it reaches __syncthreads() (or a warp collective: mma.sync, a shuffle), then the next one
runs; when the last has arrived, the first continues. That is exactly the barrier semantics of a
block, so tile loaders, shared-memory tiles, double buffering, grid-stride loops over a grid
smaller than the problem, and warp-level matrix fragments are all executed for real. A block
whose threads reach different numbers of barriers is reported as an error.

The warp collectives are written here from the PTX ISA's fragment tables, independently of the
kernels' own fragment loads, so a kernel that puts an element in the wrong register gets the
wrong product:
  mma.m16n8k8 .tf32   A: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);
                      B: b0 (t, g), b1 (t+4, g)
  mma.m16n8k16 .bf16 / .f16 (two elements per 32-bit register, lower column in the low half)
                      A: reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..);
                      B: reg0 rows (2t, 2t+1) of column g, reg1 rows (2t+8, 2t+9)
  C / D (both)        c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
with g = lane / 4 and t = lane % 4 (rows of A and C, columns of B and C). TF32 operands are read
as the hardware reads them: the top 19 bits of the register.

`emulate_cuda(monkeypatch)` replaces kernels._cuda._run (the one place that talks to CuPy), so
the CUDA paths of the ops run unchanged on CPU tensors. `max_grid` caps every grid dimension,
so grid-stride loops wrap around.
"""
import atexit
import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from segaware_caffe.kernels import _cuda

PRELUDE = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
#include <ucontext.h>

#define SEGAWARE_EMULATION 1
#define SEGAWARE_DEVICE inline
#define SHARED_ALIGN __attribute__((aligned(16)))
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
using std::fabs; using std::trunc;

struct EmuDim3 { unsigned x, y, z; };
static EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }

namespace emu {
const size_t kStack = 256 * 1024;
static int threads = 0, current = 0, error = 0;
static std::vector<ucontext_t> contexts;
static std::vector<char> stacks;
static std::vector<long> barriers;
static std::vector<char> finished;
static ucontext_t scheduler;
static std::function<void()>* body = nullptr;

static void set_thread(int t) {
  current = t;
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
}

// __syncthreads: let the next unfinished thread run; it comes back here when all have arrived
static void sync() {
  const int me = current;
  ++barriers[me];
  int next = me;
  for (int step = 1; step <= threads; ++step) {
    const int candidate = (me + step) % threads;
    if (!finished[candidate]) { next = candidate; break; }
  }
  if (next == me) return;
  set_thread(next);
  swapcontext(&contexts[me], &contexts[next]);
  set_thread(me);
}

static void entry() {
  (*body)();
  finished[current] = 1;
}

static int run(const unsigned* dims, std::function<void()> kernel) {
  gridDim = {dims[0], dims[1], dims[2]};
  blockDim = {dims[3], dims[4], dims[5]};
  threads = (int)(blockDim.x * blockDim.y * blockDim.z);
  contexts.assign(threads, ucontext_t());
  stacks.resize((size_t)threads * kStack);
  body = &kernel;
  error = 0;
  for (unsigned bz = 0; bz < gridDim.z; ++bz)
    for (unsigned by = 0; by < gridDim.y; ++by)
      for (unsigned bx = 0; bx < gridDim.x; ++bx) {
        blockIdx = {bx, by, bz};
        barriers.assign(threads, 0);
        finished.assign(threads, 0);
        for (int t = 0; t < threads; ++t) {
          getcontext(&contexts[t]);
          contexts[t].uc_stack.ss_sp = stacks.data() + (size_t)t * kStack;
          contexts[t].uc_stack.ss_size = kStack;
          contexts[t].uc_link = &scheduler;
          makecontext(&contexts[t], entry, 0);
        }
        for (int t = 0; t < threads; ++t) {
          if (finished[t]) continue;
          set_thread(t);
          swapcontext(&scheduler, &contexts[t]);
        }
        for (int t = 0; t < threads; ++t) {
          if (!finished[t] || barriers[t] != barriers[0]) {
            std::fprintf(stderr, "emulation: block (%u, %u, %u): thread %d reached %ld "
                         "barriers, thread 0 %ld\n", bx, by, bz, t, barriers[t], barriers[0]);
            return 1;
          }
        }
      }
  return 0;
}
}  // namespace emu

#define __syncthreads() emu::sync()

// warp collectives: each thread posts its operands, all meet at a barrier, each reads what it
// needs; slots alternate between two sets, so one barrier per collective suffices
template <class T>
static T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static T slots[2][1024];
  static int parity[1024];
  const int t = emu::current, p = parity[t];
  parity[t] ^= 1;
  slots[p][t] = value;
  emu::sync();
  return slots[p][(t & ~31) | ((t & 31) ^ lane_mask)];
}

static float emu_tf32_value(unsigned bits) { return __uint_as_float(bits & 0xffffe000u); }

// Every lane's A and B registers of one mma, seen by the whole warp after a barrier. Two slot
// sets alternate per thread, so a lane that runs ahead into its next mma cannot overwrite what a
// slower lane still reads. Returns lane 0's slots of this warp.
struct EmuWarpRegisters { const unsigned (*a)[4]; const unsigned (*b)[2]; };
static EmuWarpRegisters emu_exchange(const unsigned a[4], const unsigned b[2]) {
  static unsigned a_slots[2][1024][4], b_slots[2][1024][2];
  static int parity[1024];
  const int t = emu::current, p = parity[t];
  parity[t] ^= 1;
  std::memcpy(a_slots[p][t], a, sizeof(unsigned) * 4);
  std::memcpy(b_slots[p][t], b, sizeof(unsigned) * 2);
  emu::sync();
  const int base = t & ~31;
  return {a_slots[p] + base, b_slots[p] + base};
}

// d += this lane's C fragment of A (16 x K) times B (K x 8).
template <int K>
static void emu_accumulate(float d[4], const float (&A)[16][K], const float (&B)[K][8]) {
  const int lane = emu::current & 31, g = lane >> 2, q = lane & 3;
  for (int r = 0; r < 4; ++r) {
    const int row = g + (r / 2) * 8, col = 2 * q + r % 2;
    float sum = 0;
    for (int k = 0; k < K; ++k) sum += A[row][k] * B[k][col];
    d[r] += sum;
  }
}

static void emu_mma_m16n8k8_tf32(float d[4], const unsigned a[4], const unsigned b[2]) {
  const EmuWarpRegisters regs = emu_exchange(a, b);
  float A[16][8], B[8][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, q = L & 3;
    A[g][q] = emu_tf32_value(regs.a[L][0]);
    A[g + 8][q] = emu_tf32_value(regs.a[L][1]);
    A[g][q + 4] = emu_tf32_value(regs.a[L][2]);
    A[g + 8][q + 4] = emu_tf32_value(regs.a[L][3]);
    B[q][g] = emu_tf32_value(regs.b[L][0]);
    B[q + 4][g] = emu_tf32_value(regs.b[L][1]);
  }
  emu_accumulate(d, A, B);
}

static float emu_f16_to_float(unsigned short bits) {
  _Float16 h; std::memcpy(&h, &bits, 2); return (float)h;
}
static unsigned short emu_float_to_f16(float value) {
  _Float16 h = (_Float16)value; unsigned short bits; std::memcpy(&bits, &h, 2); return bits;
}
static float emu_16bit_value(unsigned short bits, bool bf16) {
  return bf16 ? __uint_as_float(((unsigned)bits) << 16) : emu_f16_to_float(bits);
}

static void emu_mma_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2], bool bf16) {
  const EmuWarpRegisters regs = emu_exchange(a, b);
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, q = L & 3;
    const unsigned* ra = regs.a[L];
    const unsigned* rb = regs.b[L];
    for (int half = 0; half < 2; ++half) {
      const int shift = 16 * half;
      A[g][2 * q + half] = emu_16bit_value((unsigned short)(ra[0] >> shift), bf16);
      A[g + 8][2 * q + half] = emu_16bit_value((unsigned short)(ra[1] >> shift), bf16);
      A[g][2 * q + 8 + half] = emu_16bit_value((unsigned short)(ra[2] >> shift), bf16);
      A[g + 8][2 * q + 8 + half] = emu_16bit_value((unsigned short)(ra[3] >> shift), bf16);
      B[2 * q + half][g] = emu_16bit_value((unsigned short)(rb[0] >> shift), bf16);
      B[2 * q + 8 + half][g] = emu_16bit_value((unsigned short)(rb[1] >> shift), bf16);
    }
  }
  emu_accumulate(d, A, B);
}
"""

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)

_WORKDIR = None
_LIBRARIES = {}   # (code, compiler) -> ctypes library, once per test session
_C_TYPES = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "i64": ctypes.c_longlong,
            "f32": ctypes.c_float, "f64": ctypes.c_double}


def _workdir():
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="segaware-cuda-emulation-"))
        atexit.register(shutil.rmtree, _WORKDIR, True)
    return _WORKDIR


def _wrappers(code, compiler):
    """extern "C" int emu_launch_<kernel>(const unsigned* dims, <kernel params>) for every
    kernel of `code` (its signature read after the preprocessor has expanded the macros)."""
    expanded = subprocess.run(
        [compiler, "-E", "-P", "-x", "c++", "-DSEGAWARE_EMULATION=1", "-D__global__=__global__",
         "-D__launch_bounds__(...)=", "-DSEGAWARE_DEVICE=inline", "-DSHARED_ALIGN=", "-"],
        input=code, capture_output=True, text=True, check=True).stdout
    wrappers = []
    for name, params in _KERNEL.findall(expanded):
        params = " ".join(params.split())
        names = [re.findall(r"\w+", p)[-1] for p in params.split(",")]
        wrappers.append(f'extern "C" int emu_launch_{name}(const unsigned* dims, {params}) {{\n'
                        f'  return emu::run(dims, [&]() {{ {name}({", ".join(names)}); }});\n}}\n')
    return "\n".join(wrappers)


def library_for(code):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("needs a C++ compiler (c++ or g++) to emulate the CUDA kernels on the CPU")
    key = (code, compiler)
    if key not in _LIBRARIES:
        digest = hashlib.sha1(code.encode()).hexdigest()[:16]
        cpp, shared_object = _workdir() / f"{digest}.cpp", _workdir() / f"{digest}.so"
        cpp.write_text(PRELUDE + code + "\n" + _wrappers(code, compiler))
        result = subprocess.run([compiler, "-O1", "-std=c++17", "-shared", "-fPIC", "-w",
                                 str(cpp), "-o", str(shared_object)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"emulation build failed:\n{result.stderr[-4000:]}")
        _LIBRARIES[key] = ctypes.CDLL(str(shared_object))
    return _LIBRARIES[key]


class Launches:
    """What the emulation ran: (kernel name, grid, block) per launch."""

    def __init__(self):
        self.calls = []

    def names(self):
        return [name for name, _, _ in self.calls]


def emulate_cuda(monkeypatch, max_grid=None):
    """Replace kernels._cuda._run by the CPU emulation; returns the Launches record. With
    max_grid, no grid dimension exceeds it (the grid-stride loops cover the rest)."""
    launches = Launches()

    def run(name, code, grid, block, converted, like, shared_mem=0):
        if max_grid is not None:
            grid = tuple(min(g, max_grid) for g in grid)
        launches.calls.append((name, grid, block))
        dims = (ctypes.c_uint * 6)(*grid, *block)
        values = [_C_TYPES[kind](value) for kind, value in converted]
        status = getattr(library_for(code), f"emu_launch_{name}")(dims, *values)
        if status:
            raise RuntimeError(f"emulated {name}: threads of a block reached different barriers")

    monkeypatch.setattr(_cuda, "_run", run)
    return launches
