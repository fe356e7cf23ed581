/* Winograd F(2x2, 3x3) for a stride-1, undilated 3x3 convolution of one group (CPU, inference):
 * each 4x4 input tile d (stride 2) gives the 2x2 output tile A^T [(G g G^T) . (B^T d B)] A, so a
 * tile's 36 multiply-adds per channel pair become 16 (with B^T = [1 0 -1 0; 0 1 1 0;
 * 0 -1 1 0; 0 1 0 -1], A^T = [1 1 1 0; 0 1 -1 -1]). The 16 products over the channels are one
 * product between the two loops here, a 1x1 convolution of 16 groups over the tiles as pixels
 * (oneDNN's, 1.2-1.4x the rate of torch.bmm on these shapes):
 *
 *   winograd_input:  v[t][e][c] = (B^T d_t B)[e] for the tiles t of tile rows [ty0, ty1) of
 *                    every image, d_t read from x in channels_last memory (N, H, W, C), zero
 *                    outside the image (the convolution's padding);
 *   winograd_output: top[n][y][x][o] = act((A^T m_t A)[y - 2ty][x - 2tx] + bias[o]
 *                    (+ top[n][y][x][o] where `accumulate`: a residual sum written into it)),
 *                    m[t][e][o] the product, top in channels_last memory; act: none,
 *                    or a ReLU / leaky ReLU of negative slope `slope` (activation 1).
 *
 * Tiles t = (n, ty - ty0, tx) in that order; work items are tiles. Channels go 16 at a time
 * (vectors). The transforms only add and subtract, so the result differs from a direct
 * convolution's by the float rounding of other sums.
 * Compiled once per element type, after the type's definitions and common.h (kernels/_native.py).
 */

#define WINO_LANES 16

void winograd_input(long threads, long batch, const scalar_t *restrict x,
                    scalar_t *restrict v, long channels, long height, long width, long pad_h,
                    long pad_w, long tiles_w, long ty0, long ty1)
{
    const long band = ty1 - ty0, tiles = batch * band * tiles_w;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < tiles; ++t) {
        const long n = t / (band * tiles_w), ty = ty0 + (t / tiles_w) % band, tx = t % tiles_w;
        const long iy0 = 2 * ty - pad_h, ix0 = 2 * tx - pad_w;
        const scalar_t *image = x + (size_t)n * height * width * channels;
        for (long c0 = 0; c0 < channels; c0 += WINO_LANES) {
            const long count = c0 + WINO_LANES < channels ? WINO_LANES : channels - c0;
            scalar_t d[4][4][WINO_LANES], r[4][4][WINO_LANES];
            for (long i = 0; i < 4; ++i) {
                for (long j = 0; j < 4; ++j) {
                    const long iy = iy0 + i, ix = ix0 + j;
                    if (iy < 0 || iy >= height || ix < 0 || ix >= width) {
                        for (long l = 0; l < WINO_LANES; ++l) d[i][j][l] = 0;
                        continue;
                    }
                    const scalar_t *pixel = image + ((size_t)iy * width + ix) * channels + c0;
                    for (long l = 0; l < count; ++l) d[i][j][l] = pixel[l];
                    for (long l = count; l < WINO_LANES; ++l) d[i][j][l] = 0;
                }
            }
            for (long j = 0; j < 4; ++j) {           /* B^T d: over the rows */
                for (long l = 0; l < WINO_LANES; ++l) {
                    r[0][j][l] = d[0][j][l] - d[2][j][l];
                    r[1][j][l] = d[1][j][l] + d[2][j][l];
                    r[2][j][l] = d[2][j][l] - d[1][j][l];
                    r[3][j][l] = d[1][j][l] - d[3][j][l];
                }
            }
            for (long i = 0; i < 4; ++i) {           /* (B^T d) B: over the columns */
                scalar_t *out[4];
                for (long j = 0; j < 4; ++j)
                    out[j] = v + ((size_t)t * 16 + i * 4 + j) * channels + c0;
                for (long l = 0; l < count; ++l) {
                    out[0][l] = r[i][0][l] - r[i][2][l];
                    out[1][l] = r[i][1][l] + r[i][2][l];
                    out[2][l] = r[i][2][l] - r[i][1][l];
                    out[3][l] = r[i][1][l] - r[i][3][l];
                }
            }
        }
    }
}

void winograd_output(long threads, long batch, const scalar_t *restrict m,
                     const scalar_t *restrict bias, scalar_t *restrict top, long outputs,
                     long out_h, long out_w, long tiles_w, long ty0, long ty1, long accumulate,
                     long activation, double slope_value)
{
    const long band = ty1 - ty0, tiles = batch * band * tiles_w;
    const scalar_t slope = (scalar_t)slope_value;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < tiles; ++t) {
        const long n = t / (band * tiles_w), ty = ty0 + (t / tiles_w) % band, tx = t % tiles_w;
        scalar_t *image = top + (size_t)n * out_h * out_w * outputs;
        for (long o0 = 0; o0 < outputs; o0 += WINO_LANES) {
            const long count = o0 + WINO_LANES < outputs ? WINO_LANES : outputs - o0;
            scalar_t s[2][4][WINO_LANES];
            for (long j = 0; j < 4; ++j) {           /* A^T m: over the rows */
                const scalar_t *e0 = m + ((size_t)t * 16 + 0 * 4 + j) * outputs + o0;
                const scalar_t *e1 = m + ((size_t)t * 16 + 1 * 4 + j) * outputs + o0;
                const scalar_t *e2 = m + ((size_t)t * 16 + 2 * 4 + j) * outputs + o0;
                const scalar_t *e3 = m + ((size_t)t * 16 + 3 * 4 + j) * outputs + o0;
                for (long l = 0; l < count; ++l) {
                    s[0][j][l] = e0[l] + e1[l] + e2[l];
                    s[1][j][l] = e1[l] - e2[l] - e3[l];
                }
            }
            for (long a = 0; a < 2; ++a) {           /* (A^T m) A: over the columns */
                const long y = 2 * ty + a;
                if (y >= out_h) break;
                for (long b = 0; b < 2; ++b) {
                    const long xo = 2 * tx + b;
                    if (xo >= out_w) break;
                    scalar_t *pixel = image + ((size_t)y * out_w + xo) * outputs + o0;
                    for (long l = 0; l < count; ++l) {
                        scalar_t value = b == 0 ? s[a][0][l] + s[a][1][l] + s[a][2][l]
                                                : s[a][1][l] - s[a][2][l] - s[a][3][l];
                        if (bias != NULL) value += bias[o0 + l];
                        if (accumulate) value += pixel[l];
                        if (activation && !(value > 0)) value = value * slope;
                        pixel[l] = value;
                    }
                }
            }
        }
    }
}
