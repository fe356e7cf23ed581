// Im2dist: y[n, k, ho, wo] = sum_c phi(x[n, c, centre] - x[n, c, neighbour_k]), phi = |d| (L1)
// or d^2 / 2 (L2). Rows of the output are (image, tap); backward rows are (image, channel).

extern "C" __global__ void im2dist_forward(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ x, scalar_t* __restrict__ out, GEOMETRY_PARAMS,
    const int norm_l1, const int remove_center, const int remove_bounds, const acc_t big) {
  const long long image_size = (long long)channels * height * width;
  const int channel_size = height * width;
  ROW_LOOP(row) {
    WINDOW_ROW(row)
    const scalar_t* image = x + n * image_size;
    scalar_t* out_row = out + (long long)row * plane;
    PIXEL_LOOP(pixel) {
      WINDOW_PIXEL(pixel)
      WINDOW_CENTRE
      acc_t value = 0;
      if (!inside(ch, cw, height, width)) {
        value = 0;                       // a patch centred outside the image: 0 on every tap
      } else if (remove_center && i == centre_i && j == centre_j) {
        value = big;
      } else if (inside(nh, nw, height, width)) {
        const scalar_t* centre = image + ch * width + cw;
        const scalar_t* neighbour = image + nh * width + nw;
        long long offset = 0;
        for (int c = 0; c < channels; ++c, offset += channel_size) {
          const acc_t difference = centre[offset] - neighbour[offset];
          value += norm_l1 ? fabs(difference) : (acc_t)0.5 * difference * difference;
        }
      } else {
        value = remove_bounds ? big : (acc_t)0;
      }
      out_row[pixel] = value;
    }
  }
}

// One thread per input element (rows = image x channel): gather every (tap, output) pair that
// reads this pixel as the patch centre (+coefficient) or as the neighbour of tap k
// (-coefficient); coefficient = d for L2, sign(d) with sign(0) = 0 for L1. No atomics.
extern "C" __global__ void im2dist_backward(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,
    scalar_t* __restrict__ grad_x, GEOMETRY_PARAMS, const int norm_l1) {
  const int taps = kernel_h * kernel_w;
  const int centre_i = kernel_h / 2, centre_j = kernel_w / 2;
  const int out_plane = out_h * out_w;
  ROW_LOOP(row) {
    const int n = row / channels;
    const scalar_t* x_plane = x + (long long)row * plane;
    const scalar_t* grad_image = grad_out + (long long)n * taps * out_plane;
    PIXEL_LOOP(pixel) {
      const int h = pixel / width, w = pixel - h * width;
      const acc_t value = x_plane[pixel];
      acc_t accumulated = 0;
      // this pixel as the centre of output (ho, wo)
      const int centre_ho = source_of(h, pad_h, centre_i, dilation_h, stride_h, out_h);
      const int centre_wo = source_of(w, pad_w, centre_j, dilation_w, stride_w, out_w);
      if (centre_ho >= 0 && centre_wo >= 0) {
        for (int k = 0, ti = 0, tj = 0; k < taps; ++k) {
          if (!(ti == centre_i && tj == centre_j)) {
            const int nh = centre_ho * stride_h - pad_h + ti * dilation_h;
            const int nw = centre_wo * stride_w - pad_w + tj * dilation_w;
            if (inside(nh, nw, height, width)) {
              const acc_t difference = value - (acc_t)x_plane[nh * width + nw];
              const acc_t coefficient = norm_l1
                  ? (acc_t)((difference > 0) - (difference < 0)) : difference;
              accumulated += coefficient
                  * (acc_t)grad_image[(long long)k * out_plane + centre_ho * out_w + centre_wo];
            }
          }
          if (++tj == kernel_w) { tj = 0; ++ti; }
        }
      }
      // this pixel as the neighbour of tap k at output (ho, wo)
      for (int k = 0, ti = 0, tj = 0; k < taps; ++k) {
        const int ho = source_of(h, pad_h, ti, dilation_h, stride_h, out_h);
        const int wo = source_of(w, pad_w, tj, dilation_w, stride_w, out_w);
        if (!(ti == centre_i && tj == centre_j) && ho >= 0 && wo >= 0) {
          const int ch = ho * stride_h - pad_h + centre_i * dilation_h;
          const int cw = wo * stride_w - pad_w + centre_j * dilation_w;
          if (inside(ch, cw, height, width)) {
            const acc_t difference = (acc_t)x_plane[ch * width + cw] - value;
            const acc_t coefficient = norm_l1
                ? (acc_t)((difference > 0) - (difference < 0)) : difference;
            accumulated -= coefficient
                * (acc_t)grad_image[(long long)k * out_plane + ho * out_w + wo];
          }
        }
        if (++tj == kernel_w) { tj = 0; ++ti; }
      }
      grad_x[(long long)row * plane + pixel] = accumulated;
    }
  }
}
