/* Im2dist's channel sums for the 'same' geometry (stride 1, every patch centred on its own
 * pixel; CPU): for each listed tap t, over the pixels p whose neighbour p + (shift_h[t],
 * shift_w[t]) lies in the image,
 *
 *   out[n][plane[t]][p] = sum over c, in channel order, of phi(x[n][c][p] - x[n][c][p + shift])
 *
 * with phi(d) = |d| (l1) or d * d / 2 (the halving after the sum, exact). Other pixels of those
 * planes are left as they are. Work items are (image, band of `rows` rows) pairs, split over
 * `threads` OpenMP threads; in a band, each channel's rows are read once for all taps while the
 * band's sums stay in cache.
 * Compiled once per element type, after the type's definitions and common.h (kernels/_native.py).
 */

void distance_taps(long threads, long items, const scalar_t *restrict x,
                   scalar_t *restrict out, const long *restrict plane,
                   const long *restrict shift_h, const long *restrict shift_w, long taps,
                   long planes, long channels, long height, long width, long l1, long rows)
{
    const long bands = (height + rows - 1) / rows;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; ++item) {
        const long n = item / bands, band_start = (item % bands) * rows;
        const long band_end = band_start + rows < height ? band_start + rows : height;
        const scalar_t *image = x + (size_t)n * channels * height * width;
        scalar_t *image_out = out + (size_t)n * planes * height * width;
        for (long c = -1; c <= channels; ++c) {     /* -1: zero the sums; channels: halve */
            for (long t = 0; t < taps; ++t) {
                const long dh = shift_h[t], dw = shift_w[t];
                long r0 = dh < 0 ? -dh : 0, r1 = dh > 0 ? height - dh : height;
                long c0 = dw < 0 ? -dw : 0, c1 = dw > 0 ? width - dw : width;
                if (r0 < band_start) r0 = band_start;
                if (r1 > band_end) r1 = band_end;
                scalar_t *target = image_out + (size_t)plane[t] * height * width;
                for (long r = r0; r < r1; ++r) {
                    scalar_t *o = target + (size_t)r * width;
                    if (c < 0) {
                        for (long w = c0; w < c1; ++w) o[w] = 0;
                    } else if (c == channels) {
                        if (!l1)
                            for (long w = c0; w < c1; ++w) o[w] *= (scalar_t)0.5;
                    } else {
                        const scalar_t *channel = image + (size_t)c * height * width;
                        const scalar_t *a = channel + (size_t)r * width;
                        const scalar_t *b = channel + (size_t)(r + dh) * width;
                        if (l1) {
                            for (long w = c0; w < c1; ++w) o[w] += SCALAR_ABS(a[w] - b[w + dw]);
                        } else {
                            for (long w = c0; w < c1; ++w) {
                                const scalar_t d = a[w] - b[w + dw];
                                o[w] += d * d;
                            }
                        }
                    }
                }
            }
        }
    }
}
