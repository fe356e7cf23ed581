// The segmentation-aware convolution as implicit GEMMs on tensor cores:
//
//   y[n, o, p] = b[o] + sum_{c, k} W[o, c, k] * x[n, c, p + off_k] * mask[n, k, p]
//
// Four kernels share one tile pipeline; none writes a column matrix to global memory. Each
// builds its operand tiles in shared memory straight from x / grad_out / W (applying the mask
// while the tile is loaded), multiplies them with warp-level mma.sync, and finishes in an
// epilogue:
//   igemm_forward          M = outputs of a group, N = output pixels, K = (tap, channel);
//                          bias added in the epilogue
//   igemm_backward_input   M = input channels, N = input pixels, K = (tap, output): the
//                          gradient each input pixel gathers through the taps that read it
//   igemm_backward_mask    per tap: M = input channels, N = output pixels, K = outputs;
//                          the epilogue multiplies by the tap's input pixel and sums the
//                          channels of the tile (one partial per channel tile, summed after)
//   igemm_backward_weight  M = outputs, N = (channel, tap), K = the pixels of every image,
//                          split over blocks (one partial per split, summed after)
// so every result is written by exactly one thread: no atomics, deterministic. The launcher
// hands the first three the weights already laid out in their K order (one contiguous A row
// per output / channel), so the A tiles load without index arithmetic:
//   forward (O, taps, C/g), input gradient (group, C/g, taps, O/g), mask (group, taps, C/g, O/g).
//
// IGEMM_MODE picks the inner product: 0 SIMT fused multiply-adds in acc_t (any GPU, float64);
// 1 TF32 mma m16n8k8; 2 3xTF32 (each float split in a TF32 high part and a TF32 remainder,
// three mma: about float32 accuracy on tensor cores); 3 BF16 and 4 FP16 mma m16n8k16. Every
// mode accumulates in acc_t (float32 for the tensor-core modes).
//
// Tiles: BM x BN outputs per block of 128 threads (2 x 2 warps of 32 x 64), BK-deep slices of
// the reduction, double-buffered in shared memory with the next slice's global loads issued
// before the current slice's mma. Shared tiles are K-contiguous rows (A: BM rows, B: BN rows)
// padded so that fragment loads are free of bank conflicts.
//
// Every tile loop is grid-strided (grid.x, grid.y, grid.z), images run from n_begin, and all
// offsets that can exceed 2^31 are 64-bit. Under SEGAWARE_EMULATION the mma, the shuffles and
// the conversions come from the CPU emulation, which runs this same code.

#ifndef IGEMM_MODE
#define IGEMM_MODE 0
#endif
#define IGEMM_SIMT 0
#define IGEMM_TF32 1
#define IGEMM_3XTF32 2
#define IGEMM_BF16 3
#define IGEMM_F16 4

// ------------------------------------------------------------------------------ conversions
SEGAWARE_DEVICE float bf16_to_float(const unsigned short bits) {
  return __uint_as_float(((unsigned)bits) << 16);
}

// float -> bf16 and -> TF32 in plain integer arithmetic: the emulation's, and the GPU's before
// sm_80 (which has no cvt instructions for them; the tensor-core modes never run there)
#if defined(SEGAWARE_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800)
// round to nearest even (cvt.rn), NaN kept quiet
SEGAWARE_DEVICE unsigned short float_to_bf16(const float value) {
  const unsigned bits = __float_as_uint(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((bits >> 16) | 0x40u);
  return (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits
SEGAWARE_DEVICE unsigned float_to_tf32(const float value) {
  const unsigned bits = __float_as_uint(value);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;   // inf / nan unchanged
  return (bits + 0x1000u) & 0xffffe000u;
}
#else
SEGAWARE_DEVICE unsigned short float_to_bf16(const float value) {
  unsigned short bits;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
  return bits;
}
SEGAWARE_DEVICE unsigned float_to_tf32(const float value) {
  unsigned bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(value));
  return bits;
}
#endif

#ifdef SEGAWARE_EMULATION
SEGAWARE_DEVICE float f16_to_float(const unsigned short bits) { return emu_f16_to_float(bits); }
SEGAWARE_DEVICE unsigned short float_to_f16(const float value) { return emu_float_to_f16(value); }
#else
SEGAWARE_DEVICE float f16_to_float(const unsigned short bits) {
  float value;
  asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
  return value;
}
SEGAWARE_DEVICE unsigned short float_to_f16(const float value) {
  unsigned short bits;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
  return bits;
}
#endif

SEGAWARE_DEVICE float load_acc(const float value) { return value; }
SEGAWARE_DEVICE double load_acc(const double value) { return value; }
SEGAWARE_DEVICE float load_acc(const bf16_t value) { return bf16_to_float(value.bits); }
SEGAWARE_DEVICE float load_acc(const f16_t value) { return f16_to_float(value.bits); }

SEGAWARE_DEVICE void store_acc(float* where, const float value) { *where = value; }
SEGAWARE_DEVICE void store_acc(double* where, const double value) { *where = value; }
SEGAWARE_DEVICE void store_acc(bf16_t* where, const float value) {
  where->bits = float_to_bf16(value);
}
SEGAWARE_DEVICE void store_acc(f16_t* where, const float value) {
  where->bits = float_to_f16(value);
}

// ------------------------------------------------------------------------------ tile shape
#define IGEMM_THREADS 128
#define IGEMM_MIN_BLOCKS 2   // resident blocks per multiprocessor ptxas plans registers for
constexpr int THREADS = IGEMM_THREADS;
constexpr int BM = 64, BN = 128;
constexpr int WARPS_N = 2;
constexpr int WM = 32, WN = 64;
constexpr int MI = WM / 16, NI = WN / 8;

#if IGEMM_MODE == IGEMM_BF16 || IGEMM_MODE == IGEMM_F16
typedef unsigned short tile_t;     // bf16 / fp16 bits
constexpr int BK = 32, KSTEP = 16, PAD = 8;
#else
typedef acc_t tile_t;              // TF32 modes keep float32 values (the TF32 mode pre-rounded)
constexpr int BK = sizeof(acc_t) == 8 ? 8 : 16, KSTEP = 8, PAD = 4;
#endif
constexpr int BKP = BK + PAD;                 // shared row stride, in tile_t
constexpr int A_ELEMS = BM * BK / THREADS;    // staged A values per thread
constexpr int B_ELEMS = BN * BK / THREADS;    // staged B values per thread (= BK: THREADS == BN)
static_assert(THREADS == BN, "one B row (pixel) per thread");
static_assert(THREADS == 2 * BM, "two threads per A row");
static_assert(BK % KSTEP == 0 && THREADS % BK == 0, "tile shape");

// a value as it is stored in a shared tile
SEGAWARE_DEVICE tile_t to_tile(const acc_t value) {
#if IGEMM_MODE == IGEMM_BF16
  return float_to_bf16(value);
#elif IGEMM_MODE == IGEMM_F16
  return float_to_f16(value);
#elif IGEMM_MODE == IGEMM_TF32
  return __uint_as_float(float_to_tf32(value));
#else
  return value;
#endif
}

// ------------------------------------------------------------------------------ warp mma
#if IGEMM_MODE == IGEMM_TF32 || IGEMM_MODE == IGEMM_3XTF32
SEGAWARE_DEVICE void mma_tf32(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef SEGAWARE_EMULATION
  emu_mma_m16n8k8_tf32(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(d[0]), "f"(d[1]), "f"(d[2]), "f"(d[3]));
#endif
}
#endif

#if IGEMM_MODE == IGEMM_BF16 || IGEMM_MODE == IGEMM_F16
SEGAWARE_DEVICE void mma_16bit(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef SEGAWARE_EMULATION
  emu_mma_m16n8k16(d, a, b, IGEMM_MODE == IGEMM_BF16);
#elif IGEMM_MODE == IGEMM_BF16
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(d[0]), "f"(d[1]), "f"(d[2]), "f"(d[3]));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(d[0]), "f"(d[1]), "f"(d[2]), "f"(d[3]));
#endif
}

SEGAWARE_DEVICE unsigned tile_word(const tile_t* row, const int column) {
  // two consecutive 16-bit elements (column even), the lower column in the low half
  return *reinterpret_cast<const unsigned*>(row + column);
}
#endif

// The warp's share of one BK slice: acc[mi][ni][r] is the output at tile row
// warp_m * WM + mi * 16 + lane / 4 + (r / 2) * 8 and tile column
// warp_n * WN + ni * 8 + (lane % 4) * 2 + r % 2 (the mma accumulator layout).
SEGAWARE_DEVICE void warp_slice(const tile_t* __restrict__ a_tile,
                                const tile_t* __restrict__ b_tile, acc_t acc[MI][NI][4]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = (warp / WARPS_N) * WM, col0 = (warp % WARPS_N) * WN;
  const int lane_group = lane >> 2, quad = lane & 3;
  for (int kk = 0; kk < BK; kk += KSTEP) {
#if IGEMM_MODE == IGEMM_SIMT
    for (int mi = 0; mi < MI; ++mi) {
      for (int ni = 0; ni < NI; ++ni) {
        for (int r = 0; r < 4; ++r) {
          const tile_t* a_row = a_tile + (row0 + mi * 16 + lane_group + (r / 2) * 8) * BKP + kk;
          const tile_t* b_row = b_tile + (col0 + ni * 8 + quad * 2 + r % 2) * BKP + kk;
          acc_t sum = acc[mi][ni][r];
          for (int q = 0; q < KSTEP; ++q) sum += a_row[q] * b_row[q];
          acc[mi][ni][r] = sum;
        }
      }
    }
#elif IGEMM_MODE == IGEMM_TF32 || IGEMM_MODE == IGEMM_3XTF32
    float a_value[MI][4], b_value[NI][2];
    for (int mi = 0; mi < MI; ++mi) {
      const tile_t* top = a_tile + (row0 + mi * 16 + lane_group) * BKP + kk + quad;
      const tile_t* bottom = top + 8 * BKP;
      a_value[mi][0] = top[0];
      a_value[mi][1] = bottom[0];
      a_value[mi][2] = top[4];
      a_value[mi][3] = bottom[4];
    }
    for (int ni = 0; ni < NI; ++ni) {
      const tile_t* column = b_tile + (col0 + ni * 8 + lane_group) * BKP + kk + quad;
      b_value[ni][0] = column[0];
      b_value[ni][1] = column[4];
    }
#if IGEMM_MODE == IGEMM_TF32
    unsigned a_bits[MI][4], b_bits[NI][2];
    for (int mi = 0; mi < MI; ++mi)
      for (int r = 0; r < 4; ++r) a_bits[mi][r] = __float_as_uint(a_value[mi][r]);
    for (int ni = 0; ni < NI; ++ni)
      for (int r = 0; r < 2; ++r) b_bits[ni][r] = __float_as_uint(b_value[ni][r]);
    for (int mi = 0; mi < MI; ++mi)
      for (int ni = 0; ni < NI; ++ni) mma_tf32(acc[mi][ni], a_bits[mi], b_bits[ni]);
#else
    unsigned a_big[MI][4], a_small[MI][4], b_big[NI][2], b_small[NI][2];
    for (int mi = 0; mi < MI; ++mi) {
      for (int r = 0; r < 4; ++r) {
        a_big[mi][r] = float_to_tf32(a_value[mi][r]);
        a_small[mi][r] = float_to_tf32(a_value[mi][r] - __uint_as_float(a_big[mi][r]));
      }
    }
    for (int ni = 0; ni < NI; ++ni) {
      for (int r = 0; r < 2; ++r) {
        b_big[ni][r] = float_to_tf32(b_value[ni][r]);
        b_small[ni][r] = float_to_tf32(b_value[ni][r] - __uint_as_float(b_big[ni][r]));
      }
    }
    for (int mi = 0; mi < MI; ++mi) {
      for (int ni = 0; ni < NI; ++ni) {
        // the small cross terms first, then the main product
        mma_tf32(acc[mi][ni], a_small[mi], b_big[ni]);
        mma_tf32(acc[mi][ni], a_big[mi], b_small[ni]);
        mma_tf32(acc[mi][ni], a_big[mi], b_big[ni]);
      }
    }
#endif
#else   // BF16 / F16
    unsigned a_words[MI][4], b_words[NI][2];
    for (int mi = 0; mi < MI; ++mi) {
      const tile_t* top = a_tile + (row0 + mi * 16 + lane_group) * BKP;
      const tile_t* bottom = top + 8 * BKP;
      a_words[mi][0] = tile_word(top, kk + quad * 2);
      a_words[mi][1] = tile_word(bottom, kk + quad * 2);
      a_words[mi][2] = tile_word(top, kk + quad * 2 + 8);
      a_words[mi][3] = tile_word(bottom, kk + quad * 2 + 8);
    }
    for (int ni = 0; ni < NI; ++ni) {
      const tile_t* column = b_tile + (col0 + ni * 8 + lane_group) * BKP;
      b_words[ni][0] = tile_word(column, kk + quad * 2);
      b_words[ni][1] = tile_word(column, kk + quad * 2 + 8);
    }
    for (int mi = 0; mi < MI; ++mi)
      for (int ni = 0; ni < NI; ++ni) mma_16bit(acc[mi][ni], a_words[mi], b_words[ni]);
#endif
  }
}

// The tile row / column of accumulator element (mi, ni, r) of this thread.
SEGAWARE_DEVICE int acc_row(const int mi, const int r) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  return (warp / WARPS_N) * WM + mi * 16 + (lane >> 2) + (r / 2) * 8;
}
SEGAWARE_DEVICE int acc_col(const int ni, const int r) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  return (warp % WARPS_N) * WN + ni * 8 + (lane & 3) * 2 + (r % 2);
}

// Where staged value e of this thread goes: A (all kernels) and B (all but the weight
// gradient) are "row of the thread" layouts; the weight gradient's B puts lanes along K.
SEGAWARE_DEVICE int a_stage_row() { return threadIdx.x / 2; }
SEGAWARE_DEVICE int a_stage_k(const int e) { return (threadIdx.x % 2) * A_ELEMS + e; }

// The software pipeline shared by the four kernels: `loader.load(kt, a, b)` reads slice kt
// into registers, `loader.b_slot(e)` says where B value e goes. Leaves acc = A * B^T over the
// slices [0, k_tiles).
template <class Loader>
SEGAWARE_DEVICE void tile_product(Loader& loader, const int k_tiles, tile_t* a_tiles,
                                  tile_t* b_tiles, acc_t acc[MI][NI][4]) {
  for (int mi = 0; mi < MI; ++mi)
    for (int ni = 0; ni < NI; ++ni)
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0;
  if (k_tiles <= 0) return;
  tile_t a_stage[A_ELEMS], b_stage[B_ELEMS];
  const int a_row = a_stage_row();
  loader.load(0, a_stage, b_stage);
  for (int e = 0; e < A_ELEMS; ++e) a_tiles[a_row * BKP + a_stage_k(e)] = a_stage[e];
  for (int e = 0; e < B_ELEMS; ++e) b_tiles[loader.b_slot(e)] = b_stage[e];
  __syncthreads();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int buffer = kt & 1;
    const bool more = kt + 1 < k_tiles;
    if (more) loader.load(kt + 1, a_stage, b_stage);
    warp_slice(a_tiles + buffer * BM * BKP, b_tiles + buffer * BN * BKP, acc);
    if (more) {
      tile_t* a_next = a_tiles + (buffer ^ 1) * BM * BKP;
      tile_t* b_next = b_tiles + (buffer ^ 1) * BN * BKP;
      for (int e = 0; e < A_ELEMS; ++e) a_next[a_row * BKP + a_stage_k(e)] = a_stage[e];
      for (int e = 0; e < B_ELEMS; ++e) b_next[loader.b_slot(e)] = b_stage[e];
    }
    __syncthreads();
  }
}

// Sizes every kernel needs (GEOMETRY_PARAMS plus outputs and group).
struct Problem {
  int channels, height, width, out_h, out_w, kernel_h, kernel_w, pad_h, pad_w;
  int stride_h, stride_w, dilation_h, dilation_w, outputs, group;
  int taps, in_per_group, out_per_group, in_plane, out_plane;
};

#define MAKE_PROBLEM(name) \
  Problem name; \
  name.channels = channels; name.height = height; name.width = width; \
  name.out_h = out_h; name.out_w = out_w; name.kernel_h = kernel_h; name.kernel_w = kernel_w; \
  name.pad_h = pad_h; name.pad_w = pad_w; name.stride_h = stride_h; name.stride_w = stride_w; \
  name.dilation_h = dilation_h; name.dilation_w = dilation_w; name.outputs = outputs; \
  name.group = group; name.taps = kernel_h * kernel_w; name.in_per_group = channels / group; \
  name.out_per_group = outputs / group; name.in_plane = height * width; \
  name.out_plane = out_h * out_w;

#define TILE_LOOPS(tiles_x, tiles_y, tiles_z) \
  for (int tile_z = (int)blockIdx.z; tile_z < (tiles_z); tile_z += (int)gridDim.z) \
    for (int tile_y = (int)blockIdx.y; tile_y < (tiles_y); tile_y += (int)gridDim.y) \
      for (int tile_x = (int)blockIdx.x; tile_x < (tiles_x); tile_x += (int)gridDim.x)

SEGAWARE_DEVICE int ceil_div(const int a, const int b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------ forward
// A[m][kidx] = W[o0 + m, c, tap], B[p][kidx] = x[n, c0 + c, pixel of tap at p] * mask[n, tap, p]
// with kidx = tap * in_per_group + c (tap-major: a thread's pixel moves only when the tap
// changes). ALIGNED: in_per_group is a multiple of BK, so every slice lies within one tap and
// the tap's pixel, bounds and mask are worked out once per slice (every released layer but the
// first); otherwise they follow the tap element by element.
template <bool ALIGNED>
struct ForwardLoader {
  const scalar_t* weight;     // (O, taps, C/g) rows of this block's outputs
  const scalar_t* x_group;    // image n, first channel of the group
  const acc_t* mask_image;    // image n
  Problem s;
  int m_valid, k_total, pixel, pixel_valid, h_base, w_base;

  SEGAWARE_DEVICE int b_slot(const int e) const { return threadIdx.x * BKP + e; }

  // where tap `tap` of this thread's pixel reads: valid, the x offset of channel 0, the mask
  SEGAWARE_DEVICE bool tap_source(const int tap, long long& offset, acc_t& mask_value) const {
    if (!pixel_valid || tap >= s.taps) return false;
    const int i = tap / s.kernel_w, j = tap - i * s.kernel_w;
    const int h = h_base + i * s.dilation_h, w = w_base + j * s.dilation_w;
    if (!inside(h, w, s.height, s.width)) return false;
    mask_value = mask_image[(long long)tap * s.out_plane + pixel];
    offset = h * s.width + w;
    return true;
  }

  SEGAWARE_DEVICE void load(const int kt, tile_t* a_stage, tile_t* b_stage) const {
    const int cg = s.in_per_group;
    {   // weights: this thread's A row, A_ELEMS consecutive kidx (contiguous)
      const int row = a_stage_row();
      const int k_first = kt * BK + a_stage_k(0);
      const scalar_t* weight_row = weight + (long long)row * k_total + k_first;
      for (int e = 0; e < A_ELEMS; ++e) {
        acc_t value = 0;
        if (row < m_valid && (ALIGNED || k_first + e < k_total)) value = load_acc(weight_row[e]);
        a_stage[e] = to_tile(value);
      }
    }
    const int k_first = kt * BK;
    if (ALIGNED) {   // masked input columns: one tap, BK consecutive channels
      const int tap = k_first / cg, c = k_first - tap * cg;
      long long offset = 0;
      acc_t mask_value = 0;
      const bool valid = tap_source(tap, offset, mask_value);
      const scalar_t* source = x_group + (long long)c * s.in_plane + offset;
      for (int e = 0; e < B_ELEMS; ++e) {
        const acc_t value = valid ? load_acc(source[(long long)e * s.in_plane]) * mask_value
                                  : (acc_t)0;
        b_stage[e] = to_tile(value);
      }
    } else {         // masked input columns: the tap may change inside the slice
      int tap = k_first / cg, c = k_first - tap * cg;
      long long offset = 0;
      acc_t mask_value = 0;
      bool valid = tap_source(tap, offset, mask_value);
      for (int e = 0; e < B_ELEMS; ++e) {
        acc_t value = 0;
        if (valid && k_first + e < k_total) {
          value = load_acc(x_group[(long long)c * s.in_plane + offset]) * mask_value;
        }
        b_stage[e] = to_tile(value);
        if (++c == cg) {
          c = 0;
          valid = tap_source(++tap, offset, mask_value);
        }
      }
    }
  }
};

template <bool ALIGNED>
SEGAWARE_DEVICE void forward_tiles(
    const scalar_t* __restrict__ x, const acc_t* __restrict__ mask,
    const scalar_t* __restrict__ weight, const acc_t* __restrict__ bias, const int has_bias,
    scalar_t* __restrict__ out, const Problem& s, const int n_begin, const int n_end) {
  __shared__ SHARED_ALIGN tile_t a_tiles[2 * BM * BKP];
  __shared__ SHARED_ALIGN tile_t b_tiles[2 * BN * BKP];
  const int m_tiles = ceil_div(s.out_per_group, BM);
  const int k_total = s.in_per_group * s.taps;
  TILE_LOOPS(ceil_div(s.out_plane, BN), s.group * m_tiles, n_end - n_begin) {
    const int n = n_begin + tile_z;
    const int g = tile_y / m_tiles, m0 = (tile_y - g * m_tiles) * BM;
    const int o0 = g * s.out_per_group + m0;
    const int p0 = tile_x * BN;
    ForwardLoader<ALIGNED> loader;
    loader.s = s;
    loader.weight = weight + (long long)o0 * k_total;
    loader.x_group = x + ((long long)n * s.channels + (long long)g * s.in_per_group) * s.in_plane;
    loader.mask_image = mask + (long long)n * s.taps * s.out_plane;
    loader.m_valid = s.out_per_group - m0;
    loader.k_total = k_total;
    loader.pixel = p0 + (int)threadIdx.x;
    loader.pixel_valid = loader.pixel < s.out_plane;
    const int ho = loader.pixel / s.out_w, wo = loader.pixel - ho * s.out_w;
    loader.h_base = ho * s.stride_h - s.pad_h;
    loader.w_base = wo * s.stride_w - s.pad_w;
    acc_t acc[MI][NI][4];
    tile_product(loader, ceil_div(k_total, BK), a_tiles, b_tiles, acc);
    scalar_t* out_tile = out + ((long long)n * s.outputs + o0) * s.out_plane;
    for (int mi = 0; mi < MI; ++mi) {
      for (int r = 0; r < 4; r += 2) {
        const int m = acc_row(mi, r);
        if (m >= loader.m_valid) continue;
        const acc_t b = has_bias ? bias[o0 + m] : (acc_t)0;
        for (int ni = 0; ni < NI; ++ni) {
          for (int q = 0; q < 2; ++q) {
            const int p = p0 + acc_col(ni, r + q);
            if (p < s.out_plane) {
              store_acc(out_tile + (long long)m * s.out_plane + p, acc[mi][ni][r + q] + b);
            }
          }
        }
      }
    }
  }
}

#define FORWARD_KERNEL(name, aligned) \
  extern "C" __global__ void __launch_bounds__(IGEMM_THREADS, IGEMM_MIN_BLOCKS) name( \
      const scalar_t* __restrict__ x, const acc_t* __restrict__ mask, \
      const scalar_t* __restrict__ weight, const acc_t* __restrict__ bias, const int has_bias, \
      scalar_t* __restrict__ out, GEOMETRY_PARAMS, const int outputs, const int group, \
      const int n_begin, const int n_end) { \
    MAKE_PROBLEM(s) \
    forward_tiles<aligned>(x, mask, weight, bias, has_bias, out, s, n_begin, n_end); \
  }
FORWARD_KERNEL(igemm_forward, false)
FORWARD_KERNEL(igemm_forward_aligned, true)

// ------------------------------------------------------------------------------ input grad
// A[m][kidx] = W[o, c0 + m, tap], B[q][kidx] = g[n, o, p] * mask[n, tap, p] where output p
// reads input pixel q through tap (else 0), kidx = tap * out_per_group + o. ALIGNED:
// out_per_group is a multiple of BK (one tap per slice).
template <bool ALIGNED>
struct InputLoader {
  const scalar_t* weight;     // (group, C/g, taps, O/g): the row of this block's channel c0
  const scalar_t* grad_group; // image n, the group's first output
  const acc_t* mask_image;
  Problem s;
  int m_valid, k_total, pixel_valid, h, w;

  SEGAWARE_DEVICE int b_slot(const int e) const { return threadIdx.x * BKP + e; }

  // the output pixel that reads this thread's input pixel through `tap`, and its mask
  SEGAWARE_DEVICE bool tap_source(const int tap, int& p, acc_t& mask_value) const {
    if (!pixel_valid || tap >= s.taps) return false;
    const int i = tap / s.kernel_w, j = tap - i * s.kernel_w;
    const int ho = source_of(h, s.pad_h, i, s.dilation_h, s.stride_h, s.out_h);
    const int wo = source_of(w, s.pad_w, j, s.dilation_w, s.stride_w, s.out_w);
    if (ho < 0 || wo < 0) return false;
    p = ho * s.out_w + wo;
    mask_value = mask_image[(long long)tap * s.out_plane + p];
    return true;
  }

  SEGAWARE_DEVICE void load(const int kt, tile_t* a_stage, tile_t* b_stage) const {
    const int og = s.out_per_group;
    {
      const int row = a_stage_row();
      const int k_first = kt * BK + a_stage_k(0);
      const scalar_t* weight_row = weight + (long long)row * k_total + k_first;
      for (int e = 0; e < A_ELEMS; ++e) {
        acc_t value = 0;
        if (row < m_valid && (ALIGNED || k_first + e < k_total)) value = load_acc(weight_row[e]);
        a_stage[e] = to_tile(value);
      }
    }
    const int k_first = kt * BK;
    if (ALIGNED) {
      const int tap = k_first / og, o = k_first - tap * og;
      int p = 0;
      acc_t mask_value = 0;
      const bool valid = tap_source(tap, p, mask_value);
      const scalar_t* source = grad_group + (long long)o * s.out_plane + p;
      for (int e = 0; e < B_ELEMS; ++e) {
        const acc_t value = valid ? load_acc(source[(long long)e * s.out_plane]) * mask_value
                                  : (acc_t)0;
        b_stage[e] = to_tile(value);
      }
    } else {
      int tap = k_first / og, o = k_first - tap * og;
      int p = 0;
      acc_t mask_value = 0;
      bool valid = tap_source(tap, p, mask_value);
      for (int e = 0; e < B_ELEMS; ++e) {
        acc_t value = 0;
        if (valid && k_first + e < k_total) {
          value = load_acc(grad_group[(long long)o * s.out_plane + p]) * mask_value;
        }
        b_stage[e] = to_tile(value);
        if (++o == og) {
          o = 0;
          valid = tap_source(++tap, p, mask_value);
        }
      }
    }
  }
};

template <bool ALIGNED>
SEGAWARE_DEVICE void input_tiles(
    const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ mask,
    const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_x, const Problem& s,
    const int n_begin, const int n_end) {
  __shared__ SHARED_ALIGN tile_t a_tiles[2 * BM * BKP];
  __shared__ SHARED_ALIGN tile_t b_tiles[2 * BN * BKP];
  const int m_tiles = ceil_div(s.in_per_group, BM);
  const int k_total = s.out_per_group * s.taps;
  TILE_LOOPS(ceil_div(s.in_plane, BN), s.group * m_tiles, n_end - n_begin) {
    const int n = n_begin + tile_z;
    const int g = tile_y / m_tiles, m0 = (tile_y - g * m_tiles) * BM;
    const int q0 = tile_x * BN;
    InputLoader<ALIGNED> loader;
    loader.s = s;
    loader.weight = weight + ((long long)g * s.in_per_group + m0) * k_total;
    loader.grad_group = grad_out + ((long long)n * s.outputs + (long long)g * s.out_per_group)
                                   * s.out_plane;
    loader.mask_image = mask + (long long)n * s.taps * s.out_plane;
    loader.m_valid = s.in_per_group - m0;
    loader.k_total = k_total;
    const int q = q0 + (int)threadIdx.x;
    loader.pixel_valid = q < s.in_plane;
    loader.h = q / s.width;
    loader.w = q - loader.h * s.width;
    acc_t acc[MI][NI][4];
    tile_product(loader, ceil_div(k_total, BK), a_tiles, b_tiles, acc);
    scalar_t* grad_tile = grad_x + ((long long)n * s.channels + (long long)g * s.in_per_group + m0)
                                   * s.in_plane;
    for (int mi = 0; mi < MI; ++mi) {
      for (int r = 0; r < 4; ++r) {
        const int m = acc_row(mi, r);
        if (m >= loader.m_valid) continue;
        for (int ni = 0; ni < NI; ++ni) {
          const int p = q0 + acc_col(ni, r);
          if (p < s.in_plane) store_acc(grad_tile + (long long)m * s.in_plane + p, acc[mi][ni][r]);
        }
      }
    }
  }
}

#define INPUT_KERNEL(name, aligned) \
  extern "C" __global__ void __launch_bounds__(IGEMM_THREADS, IGEMM_MIN_BLOCKS) name( \
      const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ mask, \
      const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_x, GEOMETRY_PARAMS, \
      const int outputs, const int group, const int n_begin, const int n_end) { \
    MAKE_PROBLEM(s) \
    input_tiles<aligned>(grad_out, mask, weight, grad_x, s, n_begin, n_end); \
  }
INPUT_KERNEL(igemm_backward_input, false)
INPUT_KERNEL(igemm_backward_input_aligned, true)

// ------------------------------------------------------------------------------ mask grad
// For tap k: A[m][o] = W[o, c0 + m, k], B[p][o] = g[n, o, p]; the epilogue forms
// sum_m acc[m][p] * x[n, c0 + m, pixel of tap k at p] for the tile's channels.
struct MaskLoader {
  const scalar_t* weight;      // (group, taps, C/g, O/g): the row of channel c0 at tap k
  const scalar_t* grad_group;  // image n, the group's first output
  Problem s;
  int m_valid, pixel, pixel_valid;

  SEGAWARE_DEVICE int b_slot(const int e) const { return threadIdx.x * BKP + e; }

  SEGAWARE_DEVICE void load(const int kt, tile_t* a_stage, tile_t* b_stage) const {
    const int og = s.out_per_group;
    const int row = a_stage_row();
    const int a_first = kt * BK + a_stage_k(0);
    const scalar_t* weight_row = weight + (long long)row * og + a_first;
    for (int e = 0; e < A_ELEMS; ++e) {
      acc_t value = 0;
      if (row < m_valid && a_first + e < og) value = load_acc(weight_row[e]);
      a_stage[e] = to_tile(value);
    }
    const int b_first = kt * BK;
    for (int e = 0; e < B_ELEMS; ++e) {
      const int o = b_first + e;
      acc_t value = 0;
      if (pixel_valid && o < og) value = load_acc(grad_group[(long long)o * s.out_plane + pixel]);
      b_stage[e] = to_tile(value);
    }
  }
};

extern "C" __global__ void __launch_bounds__(IGEMM_THREADS, IGEMM_MIN_BLOCKS) igemm_backward_mask(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ weight, acc_t* __restrict__ partial, GEOMETRY_PARAMS,
    const int outputs, const int group, const int n_begin, const int n_end) {
  // partial: (N, group * m_tiles, taps, out_plane), summed over its second axis afterwards
  __shared__ SHARED_ALIGN tile_t a_tiles[2 * BM * BKP];
  __shared__ SHARED_ALIGN tile_t b_tiles[2 * BN * BKP];
  __shared__ acc_t column_sums[BN];
  MAKE_PROBLEM(s)
  const int m_tiles = ceil_div(s.in_per_group, BM);
  const int channel_tiles = group * m_tiles;
  TILE_LOOPS(ceil_div(s.out_plane, BN), s.taps * channel_tiles, n_end - n_begin) {
    const int n = n_begin + tile_z;
    const int k = tile_y / channel_tiles, channel_tile = tile_y - k * channel_tiles;
    const int g = channel_tile / m_tiles, m0 = (channel_tile - g * m_tiles) * BM;
    const int p0 = tile_x * BN;
    MaskLoader loader;
    loader.s = s;
    loader.weight = weight + (((long long)g * s.taps + k) * s.in_per_group + m0) * s.out_per_group;
    loader.grad_group = grad_out + ((long long)n * outputs + (long long)g * s.out_per_group)
                                   * s.out_plane;
    loader.m_valid = s.in_per_group - m0;
    loader.pixel = p0 + (int)threadIdx.x;
    loader.pixel_valid = loader.pixel < s.out_plane;
    acc_t acc[MI][NI][4];
    tile_product(loader, ceil_div(s.out_per_group, BK), a_tiles, b_tiles, acc);

    // epilogue: weight each accumulator by its input pixel, sum the tile's channels
    const int i = k / kernel_w, j = k - i * kernel_w;
    const scalar_t* x_tile = x + ((long long)n * channels + (long long)g * s.in_per_group + m0)
                                 * s.in_plane;
    acc_t sums[NI][2];
    for (int ni = 0; ni < NI; ++ni) {
      for (int q = 0; q < 2; ++q) {
        const int p = p0 + acc_col(ni, q);
        acc_t sum = 0;
        if (p < s.out_plane) {
          const int ho = p / out_w, wo = p - ho * out_w;
          const int h = ho * stride_h - pad_h + i * dilation_h;
          const int w = wo * stride_w - pad_w + j * dilation_w;
          if (inside(h, w, height, width)) {
            for (int mi = 0; mi < MI; ++mi) {
              for (int half = 0; half < 2; ++half) {
                const int m = acc_row(mi, half * 2);
                if (m < loader.m_valid) {
                  sum += acc[mi][ni][half * 2 + q]
                         * load_acc(x_tile[(long long)m * s.in_plane + h * width + w]);
                }
              }
            }
          }
        }
        sums[ni][q] = sum;
      }
    }
    // the 8 lanes that share a column (lane / 4 differs), then the two warps along M
    for (int ni = 0; ni < NI; ++ni) {
      for (int q = 0; q < 2; ++q) {
        for (int lane_mask = 4; lane_mask < 32; lane_mask <<= 1) {
          sums[ni][q] += __shfl_xor_sync(0xffffffffu, sums[ni][q], lane_mask);
        }
      }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp / WARPS_N == 1 && lane < 4) {
      for (int ni = 0; ni < NI; ++ni)
        for (int q = 0; q < 2; ++q) column_sums[acc_col(ni, q)] = sums[ni][q];
    }
    __syncthreads();
    if (warp / WARPS_N == 0 && lane < 4) {
      acc_t* partial_row = partial + (((long long)n * channel_tiles + channel_tile) * s.taps + k)
                                     * s.out_plane;
      for (int ni = 0; ni < NI; ++ni) {
        for (int q = 0; q < 2; ++q) {
          const int column = acc_col(ni, q);
          if (p0 + column < s.out_plane) {
            partial_row[p0 + column] = sums[ni][q] + column_sums[column];
          }
        }
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------ weight grad
// For the group's outputs: A[m][q] = g[n, o0 + m, p], B[col][q] = x[n, c, pixel of tap] *
// mask[n, tap, p] with col = c * taps + tap (the weight's own order) and q running over the
// (image, pixel) pairs of this block's split of the reduction, BK pixels of one image at a time.
struct WeightLoader {
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t* mask;
  const long long* row_offset;   // shared: channel plane offset of each B row within an image
  const int* row_dh;             // shared: i * dilation_h, or -1 << 30 for rows past the end
  const int* row_dw;
  const int* row_tap;
  Problem s;
  int m_valid, o0, c0, n_begin, chunk_first, pixel_tiles;

  SEGAWARE_DEVICE int b_slot(const int e) const {
    return (threadIdx.x / BK + e * (THREADS / BK)) * BKP + threadIdx.x % BK;
  }

  SEGAWARE_DEVICE void load(const int kt, tile_t* a_stage, tile_t* b_stage) const {
    const int chunk = chunk_first + kt;
    const int image = chunk / pixel_tiles;
    const int n = n_begin + image;
    const int p_first = (chunk - image * pixel_tiles) * BK;
    {
      const int row = a_stage_row();
      const int p = p_first + a_stage_k(0);
      const scalar_t* grad_row = grad_out + ((long long)n * s.outputs + o0 + row) * s.out_plane;
      for (int e = 0; e < A_ELEMS; ++e) {
        acc_t value = 0;
        if (row < m_valid && p + e < s.out_plane) value = load_acc(grad_row[p + e]);
        a_stage[e] = to_tile(value);
      }
    }
    {
      const int p = p_first + (int)threadIdx.x % BK;
      const bool pixel_valid = p < s.out_plane;
      const int ho = p / s.out_w, wo = p - ho * s.out_w;
      const int h_base = ho * s.stride_h - s.pad_h, w_base = wo * s.stride_w - s.pad_w;
      const scalar_t* x_image = x + ((long long)n * s.channels + c0) * s.in_plane;
      const acc_t* mask_image = mask + (long long)n * s.taps * s.out_plane;
      for (int e = 0; e < B_ELEMS; ++e) {
        const int row = threadIdx.x / BK + e * (THREADS / BK);
        const int h = h_base + row_dh[row], w = w_base + row_dw[row];
        acc_t value = 0;
        if (pixel_valid && inside(h, w, s.height, s.width)) {
          value = load_acc(x_image[row_offset[row] + h * s.width + w])
                  * mask_image[(long long)row_tap[row] * s.out_plane + p];
        }
        b_stage[e] = to_tile(value);
      }
    }
  }
};

extern "C" __global__ void __launch_bounds__(IGEMM_THREADS, IGEMM_MIN_BLOCKS) igemm_backward_weight(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
    const acc_t* __restrict__ mask, acc_t* __restrict__ partial, GEOMETRY_PARAMS,
    const int outputs, const int group, const int n_begin, const int n_end, const int splits) {
  // partial: (splits, outputs, in_per_group * taps), summed over splits afterwards
  __shared__ SHARED_ALIGN tile_t a_tiles[2 * BM * BKP];
  __shared__ SHARED_ALIGN tile_t b_tiles[2 * BN * BKP];
  __shared__ long long row_offset[BN];
  __shared__ int row_dh[BN], row_dw[BN], row_tap[BN];
  MAKE_PROBLEM(s)
  const int m_tiles = ceil_div(s.out_per_group, BM);
  const int columns = s.in_per_group * s.taps;
  const int pixel_tiles = ceil_div(s.out_plane, BK);
  const long long chunks = (long long)(n_end - n_begin) * pixel_tiles;
  TILE_LOOPS(ceil_div(columns, BN), group * m_tiles, splits) {
    const int g = tile_y / m_tiles, m0 = (tile_y - g * m_tiles) * BM;
    const int col0 = tile_x * BN;
    {   // what each B row (a weight column: channel, tap) reads
      const int row = threadIdx.x;
      const int column = col0 + row;
      const int c = column / s.taps, k = column - c * s.taps;
      const int i = k / kernel_w, j = k - i * kernel_w;
      const bool valid = column < columns;
      row_offset[row] = valid ? (long long)c * s.in_plane : 0;
      row_dh[row] = valid ? i * dilation_h : -(1 << 30);   // never inside the image
      row_dw[row] = valid ? j * dilation_w : 0;
      row_tap[row] = valid ? k : 0;
    }
    __syncthreads();
    const int chunk_first = (int)(chunks * tile_z / splits);
    const int chunk_end = (int)(chunks * (tile_z + 1) / splits);
    WeightLoader loader;
    loader.s = s;
    loader.grad_out = grad_out;
    loader.x = x;
    loader.mask = mask;
    loader.row_offset = row_offset;
    loader.row_dh = row_dh;
    loader.row_dw = row_dw;
    loader.row_tap = row_tap;
    loader.m_valid = s.out_per_group - m0;
    loader.o0 = g * s.out_per_group + m0;
    loader.c0 = g * s.in_per_group;
    loader.n_begin = n_begin;
    loader.chunk_first = chunk_first;
    loader.pixel_tiles = pixel_tiles;
    acc_t acc[MI][NI][4];
    tile_product(loader, chunk_end - chunk_first, a_tiles, b_tiles, acc);
    acc_t* partial_tile = partial + ((long long)tile_z * outputs + loader.o0) * columns;
    for (int mi = 0; mi < MI; ++mi) {
      for (int r = 0; r < 4; ++r) {
        const int m = acc_row(mi, r);
        if (m >= loader.m_valid) continue;
        for (int ni = 0; ni < NI; ++ni) {
          const int column = col0 + acc_col(ni, r);
          if (column < columns) partial_tile[(long long)m * columns + column] = acc[mi][ni][r];
        }
      }
    }
    __syncthreads();   // the row tables are rewritten by the next tile
  }
}

// The tile shape, for the launcher to check its copy against.
extern "C" __global__ void igemm_tile_shape(int* shape) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    shape[0] = BM; shape[1] = BN; shape[2] = BK; shape[3] = THREADS;
  }
}
