// The banded segmentation-aware convolution (the float64 CUDA path; the products are cuBLAS
// GEMMs on band-sized column buffers): build the masked columns of output rows
// [row_start, row_start + band) and turn column gradients back into mask and input gradients.

// A pixel of a band of output rows, for tap (i, j): its row r in the band, its column wo, and the
// input pixel (h, w) the tap reads there (outside the image means zero padding).
#define BAND_PIXEL(pixel) \
  const int r = (pixel) / out_w, wo = (pixel) - r * out_w; \
  const int h = (row_start + r) * stride_h - pad_h + i * dilation_h; \
  const int w = wo * stride_w - pad_w + j * dilation_w;

// columns (N, C, taps, band, Wo) = x[n, c, pixel of tap k] * mask[n, k, row_start + r, wo];
// rows = (image x channel) x tap, plane = band x Wo
extern "C" __global__ void masked_columns(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ x, const scalar_t* __restrict__ mask,
    scalar_t* __restrict__ columns, GEOMETRY_PARAMS, const int row_start) {
  const int taps = kernel_h * kernel_w;
  ROW_LOOP(row) {
    const int image_channel = row / taps, k = row - image_channel * taps;
    const int n = image_channel / channels;
    const int i = k / kernel_w, j = k - i * kernel_w;
    const scalar_t* x_plane = x + (long long)image_channel * height * width;
    const scalar_t* mask_plane = mask + ((long long)n * taps + k) * out_h * out_w
                                 + (long long)row_start * out_w;
    PIXEL_LOOP(pixel) {
      BAND_PIXEL(pixel)
      acc_t value = 0;
      if (inside(h, w, height, width)) value = (acc_t)x_plane[h * width + w] * mask_plane[pixel];
      columns[(long long)row * plane + pixel] = value;
    }
  }
}

// grad_mask[n, k, row_start + r, wo] = sum_c grad_columns[n, c, k, r, wo] * x[n, c, pixel];
// rows = image x tap, plane = band x Wo
extern "C" __global__ void masked_columns_grad_mask(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_columns,
    scalar_t* __restrict__ grad_mask, GEOMETRY_PARAMS, const int row_start) {
  const int taps = kernel_h * kernel_w;
  const int channel_size = height * width;
  ROW_LOOP(row) {
    const int n = row / taps, k = row - n * taps;
    const int i = k / kernel_w, j = k - i * kernel_w;
    const scalar_t* x_image = x + (long long)n * channels * channel_size;
    // grad_columns row (n, c, k) starts at ((n * channels + c) * taps + k) * plane
    const scalar_t* grad_first = grad_columns + ((long long)n * channels * taps + k) * plane;
    const long long grad_step = (long long)taps * plane;
    scalar_t* grad_mask_plane = grad_mask + (long long)row * out_h * out_w
                                + (long long)row_start * out_w;
    PIXEL_LOOP(pixel) {
      BAND_PIXEL(pixel)
      acc_t accumulated = 0;
      if (inside(h, w, height, width)) {
        for (int c = 0; c < channels; ++c) {
          accumulated += (acc_t)grad_first[c * grad_step + pixel]
                         * (acc_t)x_image[(long long)c * channel_size + h * width + w];
        }
      }
      grad_mask_plane[pixel] = accumulated;
    }
  }
}

// grad_x[n, c, h, w] += sum over the band's taps that read (h, w) of grad_columns * mask. The
// launch covers only input rows [h_first, h_first + plane / width), the rows this band reads;
// rows = image x channel. A gather: no atomics.
extern "C" __global__ void masked_columns_grad_x(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ grad_columns,
    const scalar_t* __restrict__ mask, scalar_t* __restrict__ grad_x, GEOMETRY_PARAMS,
    const int row_start, const int band, const int h_first) {
  const int taps = kernel_h * kernel_w;
  const int band_plane = band * out_w;
  ROW_LOOP(row) {
    const int n = row / channels;
    const scalar_t* grad_rows = grad_columns + (long long)row * taps * band_plane;
    const scalar_t* mask_image = mask + (long long)n * taps * out_h * out_w;
    scalar_t* grad_x_plane = grad_x + (long long)row * height * width + (long long)h_first * width;
    PIXEL_LOOP(pixel) {
      const int dh = pixel / width, w = pixel - dh * width;
      const int h = h_first + dh;
      acc_t accumulated = 0;
      for (int ti = 0; ti < kernel_h; ++ti) {
        const int ho = source_of(h, pad_h, ti, dilation_h, stride_h, out_h);
        if (ho < row_start || ho >= row_start + band) continue;   // also ho < 0
        for (int tj = 0; tj < kernel_w; ++tj) {
          const int wo = source_of(w, pad_w, tj, dilation_w, stride_w, out_w);
          if (wo < 0) continue;
          const int k = ti * kernel_w + tj;
          accumulated += (acc_t)grad_rows[(long long)k * band_plane + (ho - row_start) * out_w + wo]
                         * (acc_t)mask_image[((long long)k * out_h + ho) * out_w + wo];
        }
      }
      grad_x_plane[pixel] += accumulated;
    }
  }
}
