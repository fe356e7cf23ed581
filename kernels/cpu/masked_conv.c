/* Masked columns of the fused segmentation-aware convolution (CPU), for one band of output rows.
 *
 * columns[n][c][k][r][w] = x[n][c][ih][iw] * mask[n][k][row_start + r][w], where tap k = i * kw + j
 * of output (ho, wo) reads ih = ho * stride_h - pad_h + i * dilation_h (iw likewise); a pixel
 * outside the image is im2col's zero times the mask (0, or NaN where the mask is not finite).
 * A product below the smallest normal number becomes a zero of its sign: a mask exp(-|lam d|)
 * underflows to subnormal numbers for distant embeddings, and a subnormal operand makes the CPU's
 * GEMM several times slower (each such term is below 1.2e-38 in float32).
 * The (image, channel) pairs are split over `threads` OpenMP threads: the runtime torch loaded
 * (libgomp), so these share torch's thread pool instead of competing with its spinning threads.
 * Compiled once per element type, after the type's definitions and common.h (kernels/_native.py).
 */

/* x, or a zero of its sign where |x| is subnormal (NaN and infinities stay) */
static inline scalar_t flushed(scalar_t x)
{
    return (x < SCALAR_MIN && x > -SCALAR_MIN) ? x * 0 : x;
}

void masked_columns(long threads, long items,
                    const scalar_t *restrict x, const scalar_t *restrict mask,
                    scalar_t *restrict columns, long channels,
                    long height, long width, long out_h, long out_w,
                    long kernel_h, long kernel_w, long pad_h, long pad_w,
                    long stride_h, long stride_w, long dilation_h, long dilation_w,
                    long row_start, long row_end)
{
    const long taps = kernel_h * kernel_w, rows = row_end - row_start;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; ++item) {
        const long n = item / channels, c = item % channels;
        const scalar_t *image = x + (size_t)item * height * width;
        const scalar_t *image_mask = mask + (size_t)n * taps * out_h * out_w;
        scalar_t *target = columns + (size_t)item * taps * rows * out_w;
        for (long k = 0; k < taps; ++k) {
            const long offset_h = (k / kernel_w) * dilation_h - pad_h;
            const long offset_w = (k % kernel_w) * dilation_w - pad_w;
            long lo, hi;
            inside_columns(offset_w, stride_w, width, out_w, &lo, &hi);
            for (long r = 0; r < rows; ++r) {
                const long ho = row_start + r, ih = ho * stride_h + offset_h;
                const scalar_t *m = image_mask + ((size_t)k * out_h + ho) * out_w;
                scalar_t *out = target + ((size_t)k * rows + r) * out_w;
                if (ih < 0 || ih >= height) {
                    for (long w = 0; w < out_w; ++w) out[w] = (scalar_t)0 * m[w];
                    continue;
                }
                const scalar_t *row = image + (size_t)ih * width;
                for (long w = 0; w < lo; ++w) out[w] = (scalar_t)0 * m[w];
                if (stride_w == 1) {
                    for (long w = lo; w < hi; ++w)
                        out[w] = flushed(row[w + offset_w] * m[w]);
                } else {
                    for (long w = lo; w < hi; ++w)
                        out[w] = flushed(row[w * stride_w + offset_w] * m[w]);
                }
                for (long w = hi; w < out_w; ++w) out[w] = (scalar_t)0 * m[w];
            }
        }
    }
}

/* The two input-side gradients of one band from its column gradients
 * grad_columns[n][c][k][r][w] (the weights' transpose times the output gradient):
 *
 *   grad_x[n][c][ih][iw] += grad_columns[n][c][k][r][w] * mask[n][k][row_start + r][w]
 *     over the taps reading inside the image, in tap order (items: (image, channel) pairs);
 *   grad_mask[n][k][row_start + r][w] = sum over c, in channel order, of
 *     grad_columns[n][c][k][r][w] * x[n][c][ih][iw], where a pixel outside reads 0
 *     (items: (image, tap) pairs).
 */
void masked_columns_grad_x(long threads, long items,
                           const scalar_t *restrict grad_columns, const scalar_t *restrict mask,
                           scalar_t *restrict grad_x, long channels,
                           long height, long width, long out_h, long out_w,
                           long kernel_h, long kernel_w, long pad_h, long pad_w,
                           long stride_h, long stride_w, long dilation_h, long dilation_w,
                           long row_start, long row_end)
{
    const long taps = kernel_h * kernel_w, rows = row_end - row_start;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; ++item) {
        const long n = item / channels;
        scalar_t *image = grad_x + (size_t)item * height * width;
        const scalar_t *image_mask = mask + (size_t)n * taps * out_h * out_w;
        const scalar_t *source = grad_columns + (size_t)item * taps * rows * out_w;
        for (long k = 0; k < taps; ++k) {
            const long offset_h = (k / kernel_w) * dilation_h - pad_h;
            const long offset_w = (k % kernel_w) * dilation_w - pad_w;
            long lo, hi;
            inside_columns(offset_w, stride_w, width, out_w, &lo, &hi);
            for (long r = 0; r < rows; ++r) {
                const long ho = row_start + r, ih = ho * stride_h + offset_h;
                if (ih < 0 || ih >= height) continue;
                const scalar_t *m = image_mask + ((size_t)k * out_h + ho) * out_w;
                const scalar_t *g = source + ((size_t)k * rows + r) * out_w;
                scalar_t *row = image + (size_t)ih * width;
                if (stride_w == 1) {
                    scalar_t *at = row + lo + offset_w;
                    for (long w = lo; w < hi; ++w, ++at) *at = MUL_ADD(g[w], m[w], *at);
                } else {
                    scalar_t *at = row + lo * stride_w + offset_w;
                    for (long w = lo; w < hi; ++w, at += stride_w) *at = MUL_ADD(g[w], m[w], *at);
                }
            }
        }
    }
}

void masked_columns_grad_mask(long threads, long items,
                              const scalar_t *restrict grad_columns, const scalar_t *restrict x,
                              scalar_t *restrict grad_mask, long channels,
                              long height, long width, long out_h, long out_w,
                              long kernel_h, long kernel_w, long pad_h, long pad_w,
                              long stride_h, long stride_w, long dilation_h, long dilation_w,
                              long row_start, long row_end)
{
    const long taps = kernel_h * kernel_w, rows = row_end - row_start;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; ++item) {
        const long n = item / taps, k = item % taps;
        const long offset_h = (k / kernel_w) * dilation_h - pad_h;
        const long offset_w = (k % kernel_w) * dilation_w - pad_w;
        long lo, hi;
        inside_columns(offset_w, stride_w, width, out_w, &lo, &hi);
        scalar_t *target = grad_mask + ((size_t)item * out_h + row_start) * out_w;
        for (long i = 0; i < rows * out_w; ++i) target[i] = 0;
        for (long c = 0; c < channels; ++c) {
            const scalar_t *image = x + ((size_t)n * channels + c) * height * width;
            const scalar_t *source = grad_columns
                + (((size_t)n * channels + c) * taps + k) * rows * out_w;
            for (long r = 0; r < rows; ++r) {
                const long ih = (row_start + r) * stride_h + offset_h;
                const scalar_t *g = source + (size_t)r * out_w;
                scalar_t *out = target + (size_t)r * out_w;
                if (ih < 0 || ih >= height) {
                    for (long w = 0; w < out_w; ++w) out[w] += g[w] * 0;
                    continue;
                }
                const scalar_t *row = image + (size_t)ih * width;
                for (long w = 0; w < lo; ++w) out[w] += g[w] * 0;
                if (stride_w == 1) {
                    for (long w = lo; w < hi; ++w) out[w] += g[w] * row[w + offset_w];
                } else {
                    for (long w = lo; w < hi; ++w) out[w] += g[w] * row[w * stride_w + offset_w];
                }
                for (long w = hi; w < out_w; ++w) out[w] += g[w] * 0;
            }
        }
    }
}

/* Masked columns of one band of output rows in pixel-major order, for a 1x1 product over the
 * pixels (oneDNN's channels_last convolution, several times the rate of a row-major GEMM with
 * few outputs on some CPUs):
 *
 *   columns[n][r][w][k][c] = x[n][ih][iw][c] * mask[n][k][row_start + r][w]
 *
 * with x in channels_last memory (N, H, W, C), the same taps, products, zeros outside the image
 * and flushed subnormal products as masked_columns. Items: (image, band row) pairs.
 */
void masked_pixel_columns(long threads, long batch,
                          const scalar_t *restrict x, const scalar_t *restrict mask,
                          scalar_t *restrict columns, long channels,
                          long height, long width, long out_h, long out_w,
                          long kernel_h, long kernel_w, long pad_h, long pad_w,
                          long stride_h, long stride_w, long dilation_h, long dilation_w,
                          long row_start, long row_end)
{
    const long taps = kernel_h * kernel_w, rows = row_end - row_start;
    const size_t plane = (size_t)out_h * out_w;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < batch * rows; ++item) {
        const long n = item / rows, ho = row_start + item % rows;
        const scalar_t *image = x + (size_t)n * height * width * channels;
        const scalar_t *row_mask = mask + (size_t)n * taps * plane + (size_t)ho * out_w;
        scalar_t *out = columns + (size_t)item * out_w * taps * channels;
        for (long wo = 0; wo < out_w; ++wo) {
            for (long k = 0; k < taps; ++k, out += channels) {
                const scalar_t m = row_mask[k * plane + wo];
                const long ih = ho * stride_h + (k / kernel_w) * dilation_h - pad_h;
                const long iw = wo * stride_w + (k % kernel_w) * dilation_w - pad_w;
                if (ih < 0 || ih >= height || iw < 0 || iw >= width) {
                    const scalar_t zero = (scalar_t)0 * m;
                    for (long c = 0; c < channels; ++c) out[c] = zero;
                    continue;
                }
                const scalar_t *pixel = image + ((size_t)ih * width + iw) * channels;
                for (long c = 0; c < channels; ++c) out[c] = flushed(pixel[c] * m);
            }
        }
    }
}

/* The input-side gradients of one band from pixel-major column gradients
 * grad_columns[n][r][w][k][c], with x and grad_x in channels_last memory:
 *
 *   grad_x[n][ih][iw][c] += grad_columns[n][r][w][k][c] * mask[n][k][row_start + r][w]
 *     over the taps reading inside the image, in tap order: masked_columns_grad_x's
 *     operations in its order (items: (image, block of 16 channels) pairs, so that no two
 *     threads write one element);
 *   grad_mask[n][k][row_start + r][w] = sum over c of grad_columns[n][r][w][k][c] *
 *     x[n][ih][iw][c], a pixel outside reading 0 (16 partial sums over the channels, then
 *     their sum and the remaining channels': another order than masked_columns_grad_mask's).
 */
#define CHANNEL_BLOCK 16

void masked_pixel_columns_grad_x(long threads, long batch,
                                 const scalar_t *restrict grad_columns,
                                 const scalar_t *restrict mask, scalar_t *restrict grad_x,
                                 long channels, long height, long width, long out_h, long out_w,
                                 long kernel_h, long kernel_w, long pad_h, long pad_w,
                                 long stride_h, long stride_w, long dilation_h, long dilation_w,
                                 long row_start, long row_end)
{
    const long taps = kernel_h * kernel_w, rows = row_end - row_start;
    const long blocks = (channels + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
    const size_t plane = (size_t)out_h * out_w;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < batch * blocks; ++item) {
        const long n = item / blocks, c0 = (item % blocks) * CHANNEL_BLOCK;
        const long count = c0 + CHANNEL_BLOCK < channels ? CHANNEL_BLOCK : channels - c0;
        scalar_t *image = grad_x + (size_t)n * height * width * channels + c0;
        const scalar_t *image_mask = mask + (size_t)n * taps * plane;
        const scalar_t *source = grad_columns + (size_t)n * rows * out_w * taps * channels + c0;
        for (long k = 0; k < taps; ++k) {
            const long offset_h = (k / kernel_w) * dilation_h - pad_h;
            const long offset_w = (k % kernel_w) * dilation_w - pad_w;
            long lo, hi;
            inside_columns(offset_w, stride_w, width, out_w, &lo, &hi);
            for (long r = 0; r < rows; ++r) {
                const long ho = row_start + r, ih = ho * stride_h + offset_h;
                if (ih < 0 || ih >= height) continue;
                const scalar_t *m = image_mask + k * plane + (size_t)ho * out_w;
                for (long w = lo; w < hi; ++w) {
                    const scalar_t mw = m[w];
                    const scalar_t *g = source + (((size_t)r * out_w + w) * taps + k) * channels;
                    scalar_t *at = image
                        + ((size_t)ih * width + w * stride_w + offset_w) * channels;
                    for (long c = 0; c < count; ++c) at[c] = MUL_ADD(g[c], mw, at[c]);
                }
            }
        }
    }
}

void masked_pixel_columns_grad_mask(long threads, long batch,
                                    const scalar_t *restrict grad_columns,
                                    const scalar_t *restrict x, scalar_t *restrict grad_mask,
                                    long channels, long height, long width, long out_h,
                                    long out_w, long kernel_h, long kernel_w, long pad_h,
                                    long pad_w, long stride_h, long stride_w, long dilation_h,
                                    long dilation_w, long row_start, long row_end)
{
    const long taps = kernel_h * kernel_w, rows = row_end - row_start;
    const size_t plane = (size_t)out_h * out_w;
    const long whole = channels - channels % CHANNEL_BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < batch * rows; ++item) {
        const long n = item / rows, ho = row_start + item % rows;
        const scalar_t *image = x + (size_t)n * height * width * channels;
        scalar_t *target = grad_mask + (size_t)n * taps * plane + (size_t)ho * out_w;
        const scalar_t *g = grad_columns + (size_t)item * out_w * taps * channels;
        for (long w = 0; w < out_w; ++w) {
            for (long k = 0; k < taps; ++k, g += channels) {
                const long ih = ho * stride_h + (k / kernel_w) * dilation_h - pad_h;
                const long iw = w * stride_w + (k % kernel_w) * dilation_w - pad_w;
                scalar_t lanes[CHANNEL_BLOCK] = {0}, total = 0;
                if (ih >= 0 && ih < height && iw >= 0 && iw < width) {
                    const scalar_t *pixel = image + ((size_t)ih * width + iw) * channels;
                    for (long c = 0; c < whole; c += CHANNEL_BLOCK)
                        for (long l = 0; l < CHANNEL_BLOCK; ++l) lanes[l] += g[c + l] * pixel[c + l];
                    for (long l = 0; l < CHANNEL_BLOCK; ++l) total += lanes[l];
                    for (long c = whole; c < channels; ++c) total += g[c] * pixel[c];
                } else {
                    for (long c = 0; c < whole; c += CHANNEL_BLOCK)
                        for (long l = 0; l < CHANNEL_BLOCK; ++l) lanes[l] += g[c + l] * 0;
                    for (long l = 0; l < CHANNEL_BLOCK; ++l) total += lanes[l];
                    for (long c = whole; c < channels; ++c) total += g[c] * 0;
                }
                target[k * plane + w] = total;
            }
        }
    }
}
