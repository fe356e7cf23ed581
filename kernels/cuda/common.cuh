// Shared by every kernel source of kernels/cuda. Each source is compiled once per element type:
// SEGAWARE_SCALAR (the storage type of the tensors) and SEGAWARE_ACC (the arithmetic type) are
// #defined in front of it. Sizes are kernel arguments, so a new image size never recompiles.
//
// Launch conventions (kernels/_cuda.py):
// * "row-plane" kernels walk a (rows x plane) grid of outputs: rows (image x channel, or
//   image x tap) by blockIdx.y, the pixels of one plane by blockIdx.x / threadIdx.x, both
//   grid-strided. Every index inside a plane is a 32-bit int and so is the row (the launcher
//   checks both fit); a flat offset is 64-bit, row * plane + pixel, and no 64-bit division or
//   modulo is ever done. `row_begin` lets a launch start at any row (the host always passes 0;
//   tests start far beyond 2^31 elements with shifted pointers).
// * Geometry arguments always follow the tensors, in GEOMETRY_PARAMS order.

#ifndef SEGAWARE_EMULATION
#define SEGAWARE_DEVICE __device__ __forceinline__
#define SHARED_ALIGN __align__(16)
#endif

// 16-bit floating-point storage, as raw bits (no header needed; kernels convert explicitly)
struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

typedef SEGAWARE_SCALAR scalar_t;
typedef SEGAWARE_ACC acc_t;

#define ROW_PLANE_PARAMS const int row_begin, const int row_end, const int plane

#define GEOMETRY_PARAMS \
  const int channels, const int height, const int width, const int out_h, const int out_w, \
  const int kernel_h, const int kernel_w, const int pad_h, const int pad_w, \
  const int stride_h, const int stride_w, const int dilation_h, const int dilation_w

#define ROW_LOOP(row) \
  for (int row = row_begin + (int)blockIdx.y; row < row_end; row += (int)gridDim.y)

#define PIXEL_LOOP(pixel) \
  for (int pixel = (int)(blockIdx.x * blockDim.x + threadIdx.x); pixel < plane; \
       pixel += (int)(blockDim.x * gridDim.x))

// A flat 1-D grid-stride loop over [begin, end) for elementwise kernels (64-bit, no division).
#define FLAT_LOOP(index, begin, end) \
  for (long long index = (begin) + (long long)blockIdx.x * blockDim.x + threadIdx.x; \
       index < (end); index += (long long)blockDim.x * gridDim.x)

// The tap of an im2col-shaped (N, taps, out_h, out_w) row: image n and tap k = (i, j).
#define WINDOW_ROW(row) \
  const int taps = kernel_h * kernel_w; \
  const int n = (row) / taps, k = (row) - n * taps; \
  const int i = k / kernel_w, j = k - i * kernel_w;

// An output pixel of that row: (ho, wo) and the tap's input pixel (nh, nw) in image
// coordinates (outside [0, height) x [0, width) means zero padding).
#define WINDOW_PIXEL(pixel) \
  const int ho = (pixel) / out_w, wo = (pixel) - ho * out_w; \
  const int nh = ho * stride_h - pad_h + i * dilation_h; \
  const int nw = wo * stride_w - pad_w + j * dilation_w;

// The patch centre of that pixel: tap (kernel_h div 2, kernel_w div 2) at (ch, cw).
#define WINDOW_CENTRE \
  const int centre_i = kernel_h / 2, centre_j = kernel_w / 2; \
  const int ch = ho * stride_h - pad_h + centre_i * dilation_h; \
  const int cw = wo * stride_w - pad_w + centre_j * dilation_w;

// The output position that reads input coordinate `coord` through tap offset `tap` along one
// axis: out = (coord + pad - tap * dilation) / stride when that divides exactly and lies in
// [0, out_size), else -1.
SEGAWARE_DEVICE int source_of(const int coord, const int pad, const int tap, const int dilation,
                              const int stride, const int out_size) {
  const int shifted = coord + pad - tap * dilation;
  if (shifted < 0) return -1;
  const int out = stride == 1 ? shifted : shifted / stride;
  if (out * stride != shifted || out >= out_size) return -1;
  return out;
}

SEGAWARE_DEVICE bool inside(const int h, const int w, const int height, const int width) {
  return h >= 0 && h < height && w >= 0 && w < width;
}
