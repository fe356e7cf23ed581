/* A fully connected layer's product for a few input rows (CPU): top[m][o] = bias[o] +
 * sum over k of weight[o][k] * x[m][k], then an optional ReLU / leaky ReLU (top < 0 times
 * `slope`), for the inference graph. At batch 1 this is a matrix-vector product bound by reading
 * the weights once: the output rows are split over `threads` OpenMP threads so that every core
 * streams its share (the BLAS matrix-vector product of torch's CPU build reads them on one
 * thread). Each dot product runs in 16 partial sums, then their sum, then the tail: another order
 * than BLAS's, within float rounding.
 * Compiled once per element type, after the type's definitions and common.h (kernels/_native.py).
 */

#define LANES 16
#define BLOCK_ROWS 8

/* out[r] = sum over k of rows[r][k] * x[k] for `count` <= BLOCK_ROWS weight rows read side by
 * side (several streams from memory at once keep the prefetchers busy; one row at a time
 * reached half the bandwidth), each in LANES partial sums, then their sum, then the tail */
static void block_dots(const scalar_t *restrict rows, long count, const scalar_t *restrict x,
                       long depth, scalar_t *restrict out)
{
    scalar_t lanes[BLOCK_ROWS][LANES] = {{0}};
    const long whole = depth - depth % LANES;
    if (count == BLOCK_ROWS) {
        for (long k = 0; k < whole; k += LANES)
            for (long r = 0; r < BLOCK_ROWS; ++r)
                for (long l = 0; l < LANES; ++l)
                    lanes[r][l] += rows[(size_t)r * depth + k + l] * x[k + l];
    } else {
        for (long k = 0; k < whole; k += LANES)
            for (long r = 0; r < count; ++r)
                for (long l = 0; l < LANES; ++l)
                    lanes[r][l] += rows[(size_t)r * depth + k + l] * x[k + l];
    }
    for (long r = 0; r < count; ++r) {
        scalar_t total = 0;
        for (long l = 0; l < LANES; ++l) total += lanes[r][l];
        for (long k = whole; k < depth; ++k) total += rows[(size_t)r * depth + k] * x[k];
        out[r] = total;
    }
}

/* activation: 0 none, 1 ReLU / leaky ReLU of negative slope `slope` */
void linear_rows(long threads, long rows, const scalar_t *restrict x,
                 const scalar_t *restrict weight, const scalar_t *restrict bias,
                 scalar_t *restrict top, long outputs, long depth, long activation,
                 double slope_value)
{
    const scalar_t slope = (scalar_t)slope_value;
    const long blocks = (outputs + BLOCK_ROWS - 1) / BLOCK_ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long block = 0; block < blocks; ++block) {
        const long o0 = block * BLOCK_ROWS;
        const long count = o0 + BLOCK_ROWS < outputs ? BLOCK_ROWS : outputs - o0;
        for (long m = 0; m < rows; ++m) {
            scalar_t values[BLOCK_ROWS];
            block_dots(weight + (size_t)o0 * depth, count, x + (size_t)m * depth, depth, values);
            for (long r = 0; r < count; ++r) {
                scalar_t value = values[r];
                if (bias != NULL) value += bias[o0 + r];
                if (activation && !(value > 0)) value = value * slope;
                top[(size_t)m * outputs + o0 + r] = value;
            }
        }
    }
}
