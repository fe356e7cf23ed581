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
        scalar_t *blend = inner == 1 ? thread_scratch(in_w, sizeof(scalar_t), &failed) : NULL;
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

/* One axis of the resize's transpose: for each input index i, the (output index, weight)
 * pairs of the outputs that read it, in output order (an output whose two indices coincide
 * gives that index both of its pairs). start has in_size + 1 entries; 0, or -1 where the tables
 * could not be allocated. */
static int axis_readers(long in_size, long out_size, long **start, long **index,
                        scalar_t **weight)
{
    const scalar_t scale = out_size > 1 ? (scalar_t)(in_size - 1) / (scalar_t)(out_size - 1) : 0;
    *start = calloc((size_t)in_size + 1, sizeof(long));
    *index = malloc((size_t)(out_size > 0 ? out_size : 1) * 2 * sizeof(long));
    *weight = malloc((size_t)(out_size > 0 ? out_size : 1) * 2 * sizeof(scalar_t));
    long *fill = malloc((size_t)(in_size > 0 ? in_size : 1) * sizeof(long));
    if (*start == NULL || *index == NULL || *weight == NULL || fill == NULL) {
        free(*start);
        free(*index);
        free(*weight);
        free(fill);
        return -1;
    }
    for (long o = 0; o < out_size; ++o) {
        long i0, i1;
        scalar_t l0, l1;
        source_of(o, in_size, out_size, scale, &i0, &i1, &l0, &l1);
        ++(*start)[i0 + 1];
        ++(*start)[i1 + 1];
    }
    for (long i = 0; i < in_size; ++i) {
        (*start)[i + 1] += (*start)[i];
        fill[i] = (*start)[i];
    }
    for (long o = 0; o < out_size; ++o) {
        long i0, i1;
        scalar_t l0, l1;
        source_of(o, in_size, out_size, scale, &i0, &i1, &l0, &l1);
        (*index)[fill[i0]] = o;
        (*weight)[fill[i0]++] = l0;
        (*index)[fill[i1]] = o;
        (*weight)[fill[i1]++] = l1;
    }
    free(fill);
    return 0;
}

/* The resize's transpose for the standard layout (training): each top pixel's gradient g goes
 * to its four input pixels with weights lh * lw. It is taken one axis at a time, the axis with
 * fewer input than output rows first, so that the scalar step (the columns' transpose, a
 * gather over each input column's readers) runs on the fewer rows and the other step is a
 * blend of whole rows (vectorised):
 *   more output rows than input rows: for each input row h, u = sum of lh * g[oh] over the
 *     rows oh that read h, then grad_x[h][w] += sum of lw * u[ow] over the readers of w;
 *   otherwise: for each output row oh, t[w] = sum of lw * g[oh][ow] over the readers of w,
 *     then grad_x[h0] += l0h * t and grad_x[h1] += l1h * t.
 * The products and their sums are torch's in another order (float rounding). grad_x is read and
 * written through the strides of a crop of the gradient (element (plane, h, w) at
 * plane * plane_stride + h * row_stride + w), which this loop zeroes first (what lies outside
 * the crop is the caller's to zero); work items are planes, which own their gradient, over
 * `threads` OpenMP threads. 0, or -1 where the scratch memory could not be allocated. */
int bilinear_backward(long threads, long planes, const scalar_t *restrict grad_top,
                      scalar_t *restrict grad_x, long in_h, long in_w, long plane_stride,
                      long row_stride, long out_h, long out_w)
{
    long *row_start, *row_index, *column_start, *column_index;
    scalar_t *row_weight, *column_weight;
    if (axis_readers(in_h, out_h, &row_start, &row_index, &row_weight) != 0)
        return -1;
    if (axis_readers(in_w, out_w, &column_start, &column_index, &column_weight) != 0) {
        free(row_start);
        free(row_index);
        free(row_weight);
        return -1;
    }
    const scalar_t scale_h = out_h > 1 ? (scalar_t)(in_h - 1) / (scalar_t)(out_h - 1) : 0;
    const int rows_first = out_h > in_h;
    const long width = out_w > in_w ? out_w : in_w;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        scalar_t *row = thread_scratch(width, sizeof(scalar_t), &failed);
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(static)
            for (long plane = 0; plane < planes; ++plane) {
                scalar_t *grad = grad_x + (size_t)plane * plane_stride;
                const scalar_t *g = grad_top + (size_t)plane * out_h * out_w;
                /* the crop starts at zero here, while the plane is in cache */
                for (long h = 0; h < in_h; ++h)
                    for (long w = 0; w < in_w; ++w) grad[(size_t)h * row_stride + w] = 0;
                if (rows_first) {
                    for (long h = 0; h < in_h; ++h) {
                        for (long ow = 0; ow < out_w; ++ow) row[ow] = 0;
                        for (long j = row_start[h]; j < row_start[h + 1]; ++j) {
                            const scalar_t lh = row_weight[j];
                            const scalar_t *source = g + (size_t)row_index[j] * out_w;
                            for (long ow = 0; ow < out_w; ++ow) row[ow] += lh * source[ow];
                        }
                        scalar_t *target = grad + (size_t)h * row_stride;
                        for (long w = 0; w < in_w; ++w) {
                            scalar_t sum = 0;
                            for (long j = column_start[w]; j < column_start[w + 1]; ++j)
                                sum += column_weight[j] * row[column_index[j]];
                            target[w] += sum;
                        }
                    }
                    continue;
                }
                for (long oh = 0; oh < out_h; ++oh) {
                    const scalar_t *source = g + (size_t)oh * out_w;
                    for (long w = 0; w < in_w; ++w) {
                        scalar_t sum = 0;
                        for (long j = column_start[w]; j < column_start[w + 1]; ++j)
                            sum += column_weight[j] * source[column_index[j]];
                        row[w] = sum;
                    }
                    long h0, h1;
                    scalar_t l0h, l1h;
                    source_of(oh, in_h, out_h, scale_h, &h0, &h1, &l0h, &l1h);
                    scalar_t *r0 = grad + (size_t)h0 * row_stride;
                    for (long w = 0; w < in_w; ++w) r0[w] += l0h * row[w];
                    scalar_t *r1 = grad + (size_t)h1 * row_stride;
                    for (long w = 0; w < in_w; ++w) r1[w] += l1h * row[w];
                }
            }
        }
        free(row);
    }
    free(row_start);
    free(row_index);
    free(row_weight);
    free(column_start);
    free(column_index);
    free(column_weight);
    return failed ? -1 : 0;
}
