/* The CRF's message (NormConvMeanfield, CPU), forward:
 *
 *   out[n][c][ho][wo] = sum over taps k of attention[n][k][ho][wo] * padded[n][c][ih][iw],
 *   ih = ho * stride_h + i * dilation_h, iw = wo * stride_w + j * dilation_w (k = i * kw + j)
 *
 * on the zero-padded Q. Work items are (image, band of `rows` output rows) pairs, split over
 * `threads` OpenMP threads; within a band the taps are added in tap order, each as one fused
 * multiply-add per element where the CPU has them (what torch's addcmul_ computes, in the same
 * order, so the result is the torch loop's bit for bit). A band's rows of every channel stay
 * in cache while all taps are added, and each attention row is read once per band.
 * Compiled once per element type, after the type's definitions and common.h (kernels/_native.py).
 */

void message_forward(long threads, long items,
                     const scalar_t *restrict padded, const scalar_t *restrict attention,
                     scalar_t *restrict out, long channels, long padded_h, long padded_w,
                     long out_h, long out_w, long kernel_h, long kernel_w,
                     long stride_h, long stride_w, long dilation_h, long dilation_w, long rows)
{
    const long taps = kernel_h * kernel_w, bands = (out_h + rows - 1) / rows;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; ++item) {
        const long n = item / bands, row_start = (item % bands) * rows;
        const long row_end = row_start + rows < out_h ? row_start + rows : out_h;
        scalar_t *image_out = out + (size_t)n * channels * out_h * out_w;
        const scalar_t *image_in = padded + (size_t)n * channels * padded_h * padded_w;
        const scalar_t *image_attention = attention + (size_t)n * taps * out_h * out_w;
        for (long c = 0; c < channels; ++c)
            for (long r = row_start; r < row_end; ++r) {
                scalar_t *o = image_out + ((size_t)c * out_h + r) * out_w;
                for (long w = 0; w < out_w; ++w) o[w] = 0;
            }
        for (long k = 0; k < taps; ++k) {
            const long offset_h = (k / kernel_w) * dilation_h;
            const long offset_w = (k % kernel_w) * dilation_w;
            for (long c = 0; c < channels; ++c) {
                const scalar_t *plane = image_in + (size_t)c * padded_h * padded_w;
                for (long r = row_start; r < row_end; ++r) {
                    const scalar_t *a = image_attention + ((size_t)k * out_h + r) * out_w;
                    const scalar_t *p = plane + (size_t)(r * stride_h + offset_h) * padded_w
                        + offset_w;
                    scalar_t *o = image_out + ((size_t)c * out_h + r) * out_w;
                    if (stride_w == 1) {
                        for (long w = 0; w < out_w; ++w) o[w] = MUL_ADD(p[w], a[w], o[w]);
                    } else {
                        for (long w = 0; w < out_w; ++w)
                            o[w] = MUL_ADD(p[w * stride_w], a[w], o[w]);
                    }
                }
            }
        }
    }
}
