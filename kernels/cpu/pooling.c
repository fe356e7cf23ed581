/* Caffe's MAX and AVE pooling without indices (the inference graph's pooling, CPU) of `planes`
 * images of height x width pixels, each pixel `inner` contiguous values (1: one channel of an
 * image in the standard layout; C: all channels of an image in channels_last memory). Window
 * (oh, ow) covers rows [oh * stride_h - pad_h, + kernel_h) clipped to the image, columns
 * likewise.
 *   MAX: the maximum starts at -FLT_MAX (an empty window keeps it) and a NaN in the window gives
 *   NaN, as torch's max pooling does. A maximum is exact, so the result is the torch path's
 *   whatever the order of the taps.
 *   AVE: the sum over the window clipped to the image, divided by the size of the window clipped
 *   to the image padded by `pad` on each side (Caffe's rule: padding counts, what lies beyond it
 *   does not); float rounding aside, the torch path's value.
 * Each output row first reduces down its window's rows (one vectorised pass per row, into a row
 * buffer), then across the window's columns one tap at a time (vectorised over the windows).
 * (plane, output row) pairs are split over `threads` OpenMP threads.
 * Compiled once per element type, after the type's definitions and common.h (kernels/_native.py).
 */

/* max(m, v), NaN if either is NaN */
static inline scalar_t maximum(scalar_t m, scalar_t v)
{
    return (v > m || v != v) ? v : m;
}

/* the window reduction: a sum (AVE) or the maximum (MAX) */
static inline scalar_t combine(scalar_t a, scalar_t b, int average)
{
    return average ? a + b : maximum(a, b);
}

/* 0 on success, -1 where a row buffer could not be allocated (nothing is then written) */
static int pool(int average, long threads, long planes, const scalar_t *restrict x,
                scalar_t *restrict top, long inner, long height, long width, long out_h,
                long out_w, long kernel_h, long kernel_w, long pad_h, long pad_w, long stride_h,
                long stride_w)
{
    const scalar_t start = average ? (scalar_t)0 : (scalar_t)-FLT_MAX;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        const long span = width * inner;     /* elements of one image row */
        scalar_t *down = thread_scratch(span, sizeof(scalar_t), &failed);
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(static)
            for (long item = 0; item < planes * out_h; ++item) {
                const long plane = item / out_h, oh = item % out_h;
                const scalar_t *image = x + (size_t)plane * height * span;
                scalar_t *row = top + ((size_t)plane * out_h + oh) * out_w * inner;
                long h0 = oh * stride_h - pad_h, h1 = h0 + kernel_h;
                /* AVE's divisor counts the rows of the window inside the padded image */
                const long rows = (h1 < height + pad_h ? h1 : height + pad_h) - h0;
                if (h0 < 0) h0 = 0;
                if (h1 > height) h1 = height;
                for (long w = 0; w < span; ++w) down[w] = start;
                for (long h = h0; h < h1; ++h) {
                    const scalar_t *in = image + (size_t)h * span;
                    for (long w = 0; w < span; ++w) down[w] = combine(down[w], in[w], average);
                }
                for (long ow = 0; ow < out_w * inner; ++ow) row[ow] = start;
                /* tap j of window ow reads column ow * stride_w - pad_w + j: over the
                 * windows where that column is inside the image */
                for (long j = 0; j < kernel_w; ++j) {
                    const long offset = j - pad_w;
                    long lo, hi;
                    inside_columns(offset, stride_w, width, out_w, &lo, &hi);
                    if (inner == 1) {
                        for (long ow = lo; ow < hi; ++ow)
                            row[ow] = combine(row[ow], down[ow * stride_w + offset], average);
                    } else {
                        for (long ow = lo; ow < hi; ++ow) {
                            scalar_t *target = row + ow * inner;
                            const scalar_t *source = down + (ow * stride_w + offset) * inner;
                            for (long c = 0; c < inner; ++c)
                                target[c] = combine(target[c], source[c], average);
                        }
                    }
                }
                if (!average)
                    continue;
                for (long ow = 0; ow < out_w; ++ow) {
                    long w0 = ow * stride_w - pad_w, w1 = w0 + kernel_w;
                    if (w1 > width + pad_w) w1 = width + pad_w;
                    const scalar_t size = (scalar_t)(rows * (w1 - w0));
                    scalar_t *target = row + ow * inner;
                    for (long c = 0; c < inner; ++c) target[c] /= size;
                }
            }
        }
        free(down);
    }
    return failed ? -1 : 0;
}

int max_pool(long threads, long planes, const scalar_t *restrict x, scalar_t *restrict top,
             long inner, long height, long width, long out_h, long out_w, long kernel_h,
             long kernel_w, long pad_h, long pad_w, long stride_h, long stride_w)
{
    return pool(0, threads, planes, x, top, inner, height, width, out_h, out_w, kernel_h,
                kernel_w, pad_h, pad_w, stride_h, stride_w);
}

int avg_pool(long threads, long planes, const scalar_t *restrict x, scalar_t *restrict top,
             long inner, long height, long width, long out_h, long out_w, long kernel_h,
             long kernel_w, long pad_h, long pad_w, long stride_h, long stride_w)
{
    return pool(1, threads, planes, x, top, inner, height, width, out_h, out_w, kernel_h,
                kernel_w, pad_h, pad_w, stride_h, stride_w);
}

/* MAX pooling with the winners' positions (training; the standard layout, planes = (image,
 * channel) pairs), as torch's max pooling computes it over the input padded with -FLT_MAX to
 * the windows' extent (the layer's torch path): each window's kernel_h x kernel_w taps in
 * row-major order, from a maximum of -inf at the first tap, each tap taken where it is greater
 * or NaN; a tap beyond the image reads -FLT_MAX, so padding never beats an image value and an
 * empty window gives -FLT_MAX, as in Caffe. index: the winner's h * width + w, or -1 where it
 * lies beyond the image. (plane, output row) pairs over `threads` OpenMP threads; the taps
 * are taken one at a time over a row of windows (vectorised). 0, or -1 where a row buffer
 * could not be allocated. */
int max_pool_indices(long threads, long planes, const scalar_t *restrict x,
                     scalar_t *restrict top, long long *restrict index, long height, long width,
                     long out_h, long out_w, long kernel_h, long kernel_w, long pad_h,
                     long pad_w, long stride_h, long stride_w)
{
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        long long *arg = thread_scratch(out_w, sizeof(long long), &failed);
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(static)
            for (long item = 0; item < planes * out_h; ++item) {
                const long plane = item / out_h, oh = item % out_h;
                const scalar_t *image = x + (size_t)plane * height * width;
                scalar_t *best = top + ((size_t)plane * out_h + oh) * out_w;
                long long *winner = index + ((size_t)plane * out_h + oh) * out_w;
                const long h0 = oh * stride_h - pad_h;
                {   /* the first tap: where torch's scan starts */
                    long lo, hi;
                    inside_columns(-pad_w, stride_w, width, out_w, &lo, &hi);
                    const int row_in = h0 >= 0 && h0 < height;
                    for (long ow = 0; ow < out_w; ++ow) {
                        best[ow] = -(scalar_t)INFINITY;
                        arg[ow] = row_in && ow >= lo && ow < hi
                            ? (long long)h0 * width + ow * stride_w - pad_w : -1;
                    }
                }
                for (long i = 0; i < kernel_h; ++i) {
                    const long h = h0 + i;
                    const int row_in = h >= 0 && h < height;
                    const scalar_t *row = image + (size_t)(row_in ? h : 0) * width;
                    for (long j = 0; j < kernel_w; ++j) {
                        const long offset = j - pad_w;
                        long lo = 0, hi = 0;
                        if (row_in) inside_columns(offset, stride_w, width, out_w, &lo, &hi);
                        /* beyond the image: -FLT_MAX, which beats only the starting -inf */
                        for (long ow = 0; ow < lo; ++ow)
                            if (-(scalar_t)FLT_MAX > best[ow]) {
                                best[ow] = -(scalar_t)FLT_MAX;
                                arg[ow] = -1;
                            }
                        const long long base = (long long)h * width + offset;
                        for (long ow = lo; ow < hi; ++ow) {
                            const scalar_t v = row[ow * stride_w + offset];
                            const int take = (v > best[ow]) | (v != v);
                            best[ow] = take ? v : best[ow];
                            arg[ow] = take ? base + (long long)ow * stride_w : arg[ow];
                        }
                        for (long ow = hi > lo ? hi : lo; ow < out_w; ++ow)
                            if (-(scalar_t)FLT_MAX > best[ow]) {
                                best[ow] = -(scalar_t)FLT_MAX;
                                arg[ow] = -1;
                            }
                    }
                }
                for (long ow = 0; ow < out_w; ++ow) winner[ow] = arg[ow];
            }
        }
        free(arg);
    }
    return failed ? -1 : 0;
}

/* Its backward: grad_x[index] += grad_top over each plane's windows in row-major order (torch's
 * order), skipping -1; grad_x is zeroed here first. Planes over `threads` OpenMP threads. */
void max_pool_indices_backward(long threads, long planes, const scalar_t *restrict grad_top,
                               const long long *restrict index, scalar_t *restrict grad_x,
                               long height, long width, long out_h, long out_w)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long plane = 0; plane < planes; ++plane) {
        scalar_t *grad = grad_x + (size_t)plane * height * width;
        const scalar_t *g = grad_top + (size_t)plane * out_h * out_w;
        const long long *winner = index + (size_t)plane * out_h * out_w;
        for (long i = 0; i < height * width; ++i) grad[i] = 0;
        for (long o = 0; o < out_h * out_w; ++o)
            if (winner[o] >= 0) grad[winner[o]] += g[o];
    }
}
