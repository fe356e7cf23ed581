// The CRF messages of NormConvMeanfield: out[n, c, p] = sum_k A[n, k, p] q[n, c, p + off_k], a
// depthwise attention-weighted sum over the taps, and its exact gradients. Gathers only.

// rows = image x channel (output plane)
extern "C" __global__ void message_forward(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ q, const scalar_t* __restrict__ attention,
    scalar_t* __restrict__ out, GEOMETRY_PARAMS) {
  const int taps = kernel_h * kernel_w;
  ROW_LOOP(row) {
    const int n = row / channels;
    const scalar_t* q_plane = q + (long long)row * height * width;
    const scalar_t* attention_image = attention + (long long)n * taps * plane;
    PIXEL_LOOP(pixel) {
      const int ho = pixel / out_w, wo = pixel - ho * out_w;
      acc_t sum = 0;
      for (int i = 0; i < kernel_h; ++i) {
        const int h = ho * stride_h - pad_h + i * dilation_h;
        if (h < 0 || h >= height) continue;
        for (int j = 0; j < kernel_w; ++j) {
          const int w = wo * stride_w - pad_w + j * dilation_w;
          if (w < 0 || w >= width) continue;
          sum += (acc_t)attention_image[(long long)(i * kernel_w + j) * plane + pixel]
                 * (acc_t)q_plane[h * width + w];
        }
      }
      out[(long long)row * plane + pixel] = sum;
    }
  }
}

// rows = image x channel (input plane)
extern "C" __global__ void message_backward_input(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ attention, scalar_t* __restrict__ grad_q, GEOMETRY_PARAMS) {
  const int taps = kernel_h * kernel_w;
  const int out_plane = out_h * out_w;
  ROW_LOOP(row) {
    const int n = row / channels;
    const scalar_t* grad_plane = grad_out + (long long)row * out_plane;
    const scalar_t* attention_image = attention + (long long)n * taps * out_plane;
    PIXEL_LOOP(pixel) {
      const int h = pixel / width, w = pixel - h * width;
      acc_t sum = 0;
      for (int i = 0; i < kernel_h; ++i) {
        const int ho = source_of(h, pad_h, i, dilation_h, stride_h, out_h);
        if (ho < 0) continue;
        for (int j = 0; j < kernel_w; ++j) {
          const int wo = source_of(w, pad_w, j, dilation_w, stride_w, out_w);
          if (wo < 0) continue;
          const int p = ho * out_w + wo;
          sum += (acc_t)attention_image[(long long)(i * kernel_w + j) * out_plane + p]
                 * (acc_t)grad_plane[p];
        }
      }
      grad_q[(long long)row * plane + pixel] = sum;
    }
  }
}

// rows = image x tap
extern "C" __global__ void message_backward_attention(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
    scalar_t* __restrict__ grad_attention, GEOMETRY_PARAMS) {
  const int channel_size = height * width;
  ROW_LOOP(row) {
    WINDOW_ROW(row)
    const scalar_t* q_image = q + (long long)n * channels * channel_size;
    const scalar_t* grad_image = grad_out + (long long)n * channels * plane;
    PIXEL_LOOP(pixel) {
      WINDOW_PIXEL(pixel)
      acc_t sum = 0;
      if (inside(nh, nw, height, width)) {
        for (int c = 0; c < channels; ++c) {
          sum += (acc_t)q_image[(long long)c * channel_size + nh * width + nw]
                 * (acc_t)grad_image[(long long)c * plane + pixel];
        }
      }
      grad_attention[(long long)row * plane + pixel] = sum;
    }
  }
}
