/* Bilinear resize with aligned corners (the Interp layer's rule, CPU inference): output pixel
 * (oh, ow) of an out_h x out_w top reads the input at real position (oh * scale_h, ow * scale_w),
 * scale = (in - 1) / (out - 1) (0 for an output of one pixel), between the two pixels around it
 * (the last pixel's neighbour is itself):
 *
 *   top = l0h * (l0w * x[h0][w0] + l1w * x[h0][w1]) + l1h * (l0w * x[h1][w0] + l1w * x[h1][w1])
 *
 * An input given as a view (a crop) is read through its strides: element (plane, h, w, c) at
 * plane * plane_stride + h * row_stride + w * pixel_stride + c, for `inner` values c per pixel
 * (1 in the standard layout, where planes are (image, channel) pairs; the channels in
 * channels_last memory, where planes are images). The top is contiguous in the same layout. In
 * the standard layout the two rows are blended first and the columns of that blend after: the
 * same four pixels and weights in another order (float rounding), and a NaN or an infinity
 * reaches the same outputs.
 * With `accumulate` the values are added to the top's (the embedding head's sum of resized
 * parts, without a buffer for each part). Work items are (plane, output row) pairs over
 * `threads` OpenMP threads.
 * Compiled once per element type, after the type's definitions and common.h (kernels/_native.py).
 */

/* input index pair and weights of output index o along one axis */
static void source_of(long o, long in_size, long out_size, scalar_t scale, long *i0, long *i1,
                      scalar_t *l0, scalar_t *l1)
{
    if (in_size == out_size) {
        *i0 = *i1 = o;
        *l0 = 1;
        *l1 = 0;
        return;
    }
    const scalar_t real = scale * (scalar_t)o;
    long index = (long)real;
    if (index > in_size - 1) index = in_size - 1;
    scalar_t lambda = real - (scalar_t)index;
    if (lambda < 0) lambda = 0;
    if (lambda > 1) lambda = 1;
    *i0 = index;
    *i1 = index + (index < in_size - 1 ? 1 : 0);
    *l1 = lambda;
    *l0 = 1 - lambda;
}

/* 0 on success, -1 where the column tables could not be allocated (nothing is then written) */
int bilinear(long threads, long planes, const scalar_t *restrict x, scalar_t *restrict top,
             long inner, long in_h, long in_w, long plane_stride, long row_stride,
             long pixel_stride, long out_h, long out_w, long accumulate)
{
    const scalar_t scale_h = out_h > 1 ? (scalar_t)(in_h - 1) / (scalar_t)(out_h - 1) : 0;
    const scalar_t scale_w = out_w > 1 ? (scalar_t)(in_w - 1) / (scalar_t)(out_w - 1) : 0;
    long *columns = malloc((size_t)(out_w > 0 ? out_w : 1) * 2 * sizeof(long));
    scalar_t *weights = malloc((size_t)(out_w > 0 ? out_w : 1) * 2 * sizeof(scalar_t));
    if (columns == NULL || weights == NULL) {
        free(columns);
        free(weights);
        return -1;
    }
    for (long ow = 0; ow < out_w; ++ow) {
        long w0, w1;
        source_of(ow, in_w, out_w, scale_w, &w0, &w1, &weights[2 * ow], &weights[2 * ow + 1]);
        columns[2 * ow] = w0;
        columns[2 * ow + 1] = w1;
    }
    const long items = planes * out_h;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        /* standard layout: the row pair's blend, l0h * r0 + l1h * r1, over the input row first
         * (vectorised), then the columns' blend from it (the same four pixels and weights) */
        scalar_t *blend = inner == 1 ? malloc((size_t)(in_w > 0 ? in_w : 1) * sizeof(scalar_t))
                                     : NULL;
        if (inner == 1 && blend == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(static)
            for (long item = 0; item < items; ++item) {
                const long plane = item / out_h, oh = item % out_h;
                long h0, h1;
                scalar_t l0h, l1h;
                source_of(oh, in_h, out_h, scale_h, &h0, &h1, &l0h, &l1h);
                const scalar_t *r0 = x + (size_t)plane * plane_stride + (size_t)h0 * row_stride;
                const scalar_t *r1 = x + (size_t)plane * plane_stride + (size_t)h1 * row_stride;
                scalar_t *out = top + ((size_t)plane * out_h + oh) * out_w * inner;
                if (inner == 1) {
                    if (pixel_stride == 1) {
                        for (long w = 0; w < in_w; ++w) blend[w] = l0h * r0[w] + l1h * r1[w];
                    } else {
                        for (long w = 0; w < in_w; ++w)
                            blend[w] = l0h * r0[w * pixel_stride] + l1h * r1[w * pixel_stride];
                    }
                    for (long ow = 0; ow < out_w; ++ow) {
                        const scalar_t value = weights[2 * ow] * blend[columns[2 * ow]]
                            + weights[2 * ow + 1] * blend[columns[2 * ow + 1]];
                        out[ow] = accumulate ? out[ow] + value : value;
                    }
                    continue;
                }
                for (long ow = 0; ow < out_w; ++ow) {
                    const scalar_t l0w = weights[2 * ow], l1w = weights[2 * ow + 1];
                    const long c0 = columns[2 * ow] * pixel_stride;
                    const long c1 = columns[2 * ow + 1] * pixel_stride;
                    const scalar_t *a0 = r0 + c0, *a1 = r0 + c1, *b0 = r1 + c0, *b1 = r1 + c1;
                    scalar_t *o = out + ow * inner;
                    if (accumulate) {
                        for (long c = 0; c < inner; ++c)
                            o[c] += l0h * (l0w * a0[c] + l1w * a1[c])
                                + l1h * (l0w * b0[c] + l1w * b1[c]);
                    } else {
                        for (long c = 0; c < inner; ++c)
                            o[c] = l0h * (l0w * a0[c] + l1w * a1[c])
                                + l1h * (l0w * b0[c] + l1w * b1[c]);
                    }
                }
            }
        }
        free(blend);
    }
    if (failed) {
        free(columns);
        free(weights);
        return -1;
    }
    free(columns);
    free(weights);
    return 0;
}

/* The resize's transpose for the standard layout (training): each top pixel's gradient g goes
 * to its four input pixels, grad_x[h][w] += (lh * lw) * g, in the top's row-major order (as
 * torch's bilinear backward accumulates). grad_x is read and written through the strides of a
 * crop of a zeroed gradient (element (plane, h, w) at plane * plane_stride + h * row_stride +
 * w); work items are planes, which own their gradient, over `threads` OpenMP threads. */
void bilinear_backward(long threads, long planes, const scalar_t *restrict grad_top,
                       scalar_t *restrict grad_x, long in_h, long in_w, long plane_stride,
                       long row_stride, long out_h, long out_w)
{
    const scalar_t scale_h = out_h > 1 ? (scalar_t)(in_h - 1) / (scalar_t)(out_h - 1) : 0;
    const scalar_t scale_w = out_w > 1 ? (scalar_t)(in_w - 1) / (scalar_t)(out_w - 1) : 0;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long plane = 0; plane < planes; ++plane) {
        scalar_t *grad = grad_x + (size_t)plane * plane_stride;
        const scalar_t *g = grad_top + (size_t)plane * out_h * out_w;
        for (long oh = 0; oh < out_h; ++oh) {
            long h0, h1;
            scalar_t l0h, l1h;
            source_of(oh, in_h, out_h, scale_h, &h0, &h1, &l0h, &l1h);
            scalar_t *r0 = grad + (size_t)h0 * row_stride, *r1 = grad + (size_t)h1 * row_stride;
            for (long ow = 0; ow < out_w; ++ow) {
                long w0, w1;
                scalar_t l0w, l1w;
                source_of(ow, in_w, out_w, scale_w, &w0, &w1, &l0w, &l1w);
                const scalar_t value = g[oh * out_w + ow];
                r0[w0] += l0h * l0w * value;
                r0[w1] += l0h * l1w * value;
                r1[w0] += l1h * l0w * value;
                r1[w1] += l1h * l1w * value;
            }
        }
    }
}
