// Im2parity: y[n, k, ho, wo] = 1 where trunc(label[centre]) == trunc(label[neighbour_k]), else
// 0; out-of-image neighbours are label 0; with an ignore label, taps touching it (and patches
// centred outside the image) output it (else 0). Only the last channel counts.

extern "C" __global__ void im2parity_forward(
    ROW_PLANE_PARAMS, const scalar_t* __restrict__ labels, scalar_t* __restrict__ out,
    GEOMETRY_PARAMS, const int has_ignore, const acc_t ignore_label) {
  const long long image_size = (long long)channels * height * width;
  const long long last_channel = (long long)(channels - 1) * height * width;
  const acc_t fill_value = has_ignore ? ignore_label : (acc_t)0;
  ROW_LOOP(row) {
    WINDOW_ROW(row)
    const scalar_t* label_plane = labels + n * image_size + last_channel;
    scalar_t* out_row = out + (long long)row * plane;
    PIXEL_LOOP(pixel) {
      WINDOW_PIXEL(pixel)
      WINDOW_CENTRE
      acc_t value = fill_value;
      if (inside(ch, cw, height, width)) {
        const acc_t centre_label = trunc((acc_t)label_plane[ch * width + cw]);
        const acc_t neighbour_label = inside(nh, nw, height, width)
            ? trunc((acc_t)label_plane[nh * width + nw]) : (acc_t)0;
        if (has_ignore && (neighbour_label == ignore_label || centre_label == ignore_label)) {
          value = fill_value;
        } else {
          value = neighbour_label == centre_label ? (acc_t)1 : (acc_t)0;
        }
      }
      out_row[pixel] = value;
    }
  }
}
