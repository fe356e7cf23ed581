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

/* Im2dist's backward for any geometry (CPU training), plane by plane ((image, channel) pairs over
 * `threads` OpenMP threads), as the torch loop beside it computes it: output (ho, wo) has its
 * patch centre P and its tap-k neighbour Q (image pixels; outside the image x reads 0), and
 * for each tap but the centre, in tap order,
 *
 *   c = phi'(x[P] - x[Q]) * (g[k][ho][wo] * v),  v = 1 where P and Q are both in the image, else 0
 *   centre[ho][wo] += c,  grad_x[Q] -= c (Q in the image)
 *
 * with phi'(d) = sign(d) (l1; 0 for 0 and NaN) or d; then grad_x[P] += centre[ho][wo] (P in
 * the image). Every element receives the same operations in the same order as there, so the two
 * agree bit for bit. grad_x is written whole (zeroed first). 0, or -1 where a plane's centre
 * buffer could not be allocated. */
int distance_backward(long threads, long planes, const scalar_t *restrict x,
                      const scalar_t *restrict grad_out, scalar_t *restrict grad_x,
                      long channels, long height, long width, long out_h, long out_w,
                      long kernel_h, long kernel_w, long pad_h, long pad_w, long stride_h,
                      long stride_w, long dilation_h, long dilation_w, long l1)
{
    const long taps = kernel_h * kernel_w, centre_tap = (kernel_h / 2) * kernel_w + kernel_w / 2;
    const long centre_h = (kernel_h / 2) * dilation_h - pad_h;
    const long centre_w = (kernel_w / 2) * dilation_w - pad_w;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        scalar_t *centre = thread_scratch(out_h * out_w, sizeof(scalar_t), &failed);
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(static)
            for (long plane = 0; plane < planes; ++plane) {
                const long n = plane / channels;
                const scalar_t *image = x + (size_t)plane * height * width;
                scalar_t *grad = grad_x + (size_t)plane * height * width;
                const scalar_t *g_image = grad_out + (size_t)n * taps * out_h * out_w;
                for (long i = 0; i < height * width; ++i) grad[i] = 0;
                for (long i = 0; i < out_h * out_w; ++i) centre[i] = 0;
                /* output columns whose centre lies in the image: [pc0, pc1) */
                long pc0, pc1;
                inside_columns(centre_w, stride_w, width, out_w, &pc0, &pc1);
                for (long k = 0; k < taps; ++k) {
                    if (k == centre_tap) continue;
                    const long offset_h = (k / kernel_w) * dilation_h - pad_h;
                    const long offset_w = (k % kernel_w) * dilation_w - pad_w;
                    long qc0, qc1;        /* ... and whose neighbour does */
                    inside_columns(offset_w, stride_w, width, out_w, &qc0, &qc1);
                    const long lo = pc0 > qc0 ? pc0 : qc0, hi = pc1 < qc1 ? pc1 : qc1;
                    for (long ho = 0; ho < out_h; ++ho) {
                        const long ph = ho * stride_h + centre_h, qh = ho * stride_h + offset_h;
                        const int p_row = ph >= 0 && ph < height, q_row = qh >= 0 && qh < height;
                        const scalar_t *g = g_image + ((size_t)k * out_h + ho) * out_w;
                        scalar_t *sum = centre + (size_t)ho * out_w;
                        const scalar_t *p_pixels = image + (size_t)ph * width + centre_w;
                        const scalar_t *q_pixels = image + (size_t)qh * width + offset_w;
                        scalar_t *q_grad = grad + (size_t)qh * width + offset_w;
                        long w = 0;
                        if (p_row && q_row && stride_w == 1) {
                            /* both in the image: v = 1 */
                            for (; w < lo; ++w) {
                                const int p_in = w >= pc0 && w < pc1, q_in = w >= qc0 && w < qc1;
                                const scalar_t d = (p_in ? p_pixels[w] : 0) - (q_in ? q_pixels[w] : 0);
                                const scalar_t c = (l1 ? (scalar_t)((d > 0) - (d < 0)) : d)
                                    * (g[w] * (scalar_t)(p_in && q_in));
                                sum[w] += c;
                                if (q_in) q_grad[w] -= c;
                            }
                            if (l1) {
                                for (; w < hi; ++w) {
                                    const scalar_t d = p_pixels[w] - q_pixels[w];
                                    const scalar_t c = (scalar_t)((d > 0) - (d < 0)) * (g[w] * (scalar_t)1);
                                    sum[w] += c;
                                    q_grad[w] -= c;
                                }
                            } else {
                                for (; w < hi; ++w) {
                                    const scalar_t c = (p_pixels[w] - q_pixels[w]) * (g[w] * (scalar_t)1);
                                    sum[w] += c;
                                    q_grad[w] -= c;
                                }
                            }
                        }
                        for (; w < out_w; ++w) {
                            const int p_in = p_row && w >= pc0 && w < pc1;
                            const int q_in = q_row && w >= qc0 && w < qc1;
                            const scalar_t xp = p_in ? image[(size_t)ph * width + w * stride_w + centre_w] : 0;
                            const scalar_t xq = q_in ? image[(size_t)qh * width + w * stride_w + offset_w] : 0;
                            const scalar_t d = xp - xq;
                            const scalar_t c = (l1 ? (scalar_t)((d > 0) - (d < 0)) : d)
                                * (g[w] * (scalar_t)(p_in && q_in));
                            sum[w] += c;
                            if (q_in) grad[(size_t)qh * width + w * stride_w + offset_w] -= c;
                        }
                    }
                }
                for (long ho = 0; ho < out_h; ++ho) {
                    const long ph = ho * stride_h + centre_h;
                    if (ph < 0 || ph >= height) continue;
                    const scalar_t *sum = centre + (size_t)ho * out_w;
                    for (long w = pc0; w < pc1; ++w)
                        grad[(size_t)ph * width + w * stride_w + centre_w] += sum[w];
                }
            }
        }
        free(centre);
    }
    return failed ? -1 : 0;
}
