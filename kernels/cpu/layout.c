/* Pixel rows to channel planes (CPU): top[n][c][p] = rows[n][p][c] (+ bias[c] when bias is not
 * NULL), the conversion of an image from channels_last memory to the standard layout, with a
 * per-channel bias folded into the same pass. Tiles of pixels x channels keep both sides in
 * cache; work items are (image, tile of pixels) pairs over `threads` OpenMP threads.
 * Compiled once per element type, after the type's definitions and common.h (kernels/_native.py).
 */

#define TILE 64

void rows_to_planes(long threads, long images, const scalar_t *restrict rows,
                    scalar_t *restrict top, const scalar_t *restrict bias, long pixels,
                    long channels)
{
    const long tiles = (pixels + TILE - 1) / TILE;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < images * tiles; ++item) {
        const long n = item / tiles, p0 = (item % tiles) * TILE;
        const long p1 = p0 + TILE < pixels ? p0 + TILE : pixels;
        const scalar_t *source = rows + (size_t)n * pixels * channels;
        scalar_t *target = top + (size_t)n * pixels * channels;
        for (long c0 = 0; c0 < channels; c0 += TILE) {
            const long c1 = c0 + TILE < channels ? c0 + TILE : channels;
            for (long c = c0; c < c1; ++c) {
                scalar_t *plane = target + (size_t)c * pixels;
                const scalar_t b = bias != NULL ? bias[c] : 0;
                if (bias != NULL) {
                    for (long p = p0; p < p1; ++p) plane[p] = source[(size_t)p * channels + c] + b;
                } else {
                    for (long p = p0; p < p1; ++p) plane[p] = source[(size_t)p * channels + c];
                }
            }
        }
    }
}

/* The other way: rows[n][p][c] = planes[n][c][p], an image from the standard layout to
 * channels_last memory; work items are (image, tile of pixels) pairs. */
void planes_to_rows(long threads, long images, const scalar_t *restrict planes,
                    scalar_t *restrict rows, long pixels, long channels)
{
    const long tiles = (pixels + TILE - 1) / TILE;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < images * tiles; ++item) {
        const long n = item / tiles, p0 = (item % tiles) * TILE;
        const long p1 = p0 + TILE < pixels ? p0 + TILE : pixels;
        const scalar_t *source = planes + (size_t)n * pixels * channels;
        scalar_t *target = rows + (size_t)n * pixels * channels;
        for (long c0 = 0; c0 < channels; c0 += TILE) {
            const long c1 = c0 + TILE < channels ? c0 + TILE : channels;
            for (long p = p0; p < p1; ++p) {
                scalar_t *row = target + (size_t)p * channels;
                for (long c = c0; c < c1; ++c) row[c] = source[(size_t)c * pixels + p];
            }
        }
    }
}
