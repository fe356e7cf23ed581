// NormConv: y[n, o, p] = b[o] + sum_{c in group(o), k} W[o, c, k] A[n, k, p] x[n, c, p + off_k]
// with the attention A given (softmax of the logits, taken by the caller). Every kernel gathers
// (one thread per written element), so there are no atomics and results are deterministic.
// The group and output count follow GEOMETRY_PARAMS.

// rows = image x output
extern "C" __global__ void norm_conv_forward(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ x, const scalar_t* __restrict__ attention,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias, const int has_bias,
    scalar_t* __restrict__ out, GEOMETRY_PARAMS, const int outputs, const int group) {
  const int in_per_group = channels / group;
  const int out_per_group = outputs / group;
  const int taps = kernel_h * kernel_w;
  const int channel_size = height * width;
  ROW_LOOP(row) {
    const int n = row / outputs, o = row - n * outputs;
    const scalar_t* x_group = x + ((long long)n * channels + (o / out_per_group) * in_per_group)
                                  * channel_size;
    const scalar_t* attention_image = attention + (long long)n * taps * plane;
    const scalar_t* weight_o = weight + (long long)o * in_per_group * taps;
    PIXEL_LOOP(pixel) {
      const int ho = pixel / out_w, wo = pixel - ho * out_w;
      acc_t sum = 0;
      for (int i = 0; i < kernel_h; ++i) {
        const int h = ho * stride_h - pad_h + i * dilation_h;
        if (h < 0 || h >= height) continue;
        for (int j = 0; j < kernel_w; ++j) {
          const int w = wo * stride_w - pad_w + j * dilation_w;
          if (w < 0 || w >= width) continue;
          const int k = i * kernel_w + j;
          const acc_t a = attention_image[(long long)k * plane + pixel];
          acc_t tap_sum = 0;
          long long offset = h * width + w;
          for (int c = 0; c < in_per_group; ++c, offset += channel_size) {
            tap_sum += (acc_t)weight_o[c * taps + k] * (acc_t)x_group[offset];
          }
          sum += a * tap_sum;
        }
      }
      out[(long long)row * plane + pixel] = has_bias ? sum + (acc_t)bias[o] : sum;
    }
  }
}

// rows = image x input channel: dx[c, q] = sum over the taps reading q and the outputs of c's
// group of W[o, c, k] * A[k, p] * g[o, p]
extern "C" __global__ void norm_conv_backward_input(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ attention, const scalar_t* __restrict__ weight,
    scalar_t* __restrict__ grad_x, GEOMETRY_PARAMS, const int outputs, const int group) {
  const int in_per_group = channels / group;
  const int out_per_group = outputs / group;
  const int taps = kernel_h * kernel_w;
  const int out_plane = out_h * out_w;
  ROW_LOOP(row) {
    const int n = row / channels, c = row - n * channels;
    const int c_in_group = c % in_per_group;
    const int first_output = (c / in_per_group) * out_per_group;
    const scalar_t* grad_group = grad_out + ((long long)n * outputs + first_output) * out_plane;
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
          const int k = i * kernel_w + j;
          const int p = ho * out_w + wo;
          acc_t col_grad = 0;
          for (int o = 0; o < out_per_group; ++o) {
            col_grad += (acc_t)weight[((long long)(first_output + o) * in_per_group + c_in_group)
                                      * taps + k]
                        * (acc_t)grad_group[(long long)o * out_plane + p];
          }
          sum += col_grad * (acc_t)attention_image[(long long)k * out_plane + p];
        }
      }
      grad_x[(long long)row * plane + pixel] = sum;
    }
  }
}

// rows = image x tap: G[n, k, p] = sum_c x_tap[c] * (W^T g)[c, k]
extern "C" __global__ void norm_conv_backward_taps(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ weight, scalar_t* __restrict__ tap_grads, GEOMETRY_PARAMS,
    const int outputs, const int group) {
  const int in_per_group = channels / group;
  const int out_per_group = outputs / group;
  const int channel_size = height * width;
  ROW_LOOP(row) {
    WINDOW_ROW(row)
    const scalar_t* x_image = x + (long long)n * channels * channel_size;
    const scalar_t* grad_image = grad_out + (long long)n * outputs * plane;
    PIXEL_LOOP(pixel) {
      WINDOW_PIXEL(pixel)
      acc_t sum = 0;
      if (inside(nh, nw, height, width)) {
        for (int c = 0; c < channels; ++c) {
          const int first_output = (c / in_per_group) * out_per_group;
          const int c_in_group = c - (c / in_per_group) * in_per_group;
          acc_t col_grad = 0;
          for (int o = first_output; o < first_output + out_per_group; ++o) {
            col_grad += (acc_t)weight[((long long)o * in_per_group + c_in_group) * taps + k]
                        * (acc_t)grad_image[(long long)o * plane + pixel];
          }
          sum += (acc_t)x_image[(long long)c * channel_size + nh * width + nw] * col_grad;
        }
      }
      tap_grads[(long long)row * plane + pixel] = sum;
    }
  }
}
