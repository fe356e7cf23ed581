/* What every compiled CPU loop shares; kernels/_native.py puts it in front of each source, after
 * the element type's definitions (scalar_t, SCALAR_MIN, SCALAR_FMA, SCALAR_ABS). */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

/* a * b + c rounded once where the CPU has fused multiply-adds, as torch's addcmul computes it */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MUL_ADD(a, b, c) SCALAR_FMA(a, b, c)
#else
#define MUL_ADD(a, b, c) ((a) * (b) + (c))
#endif

/* Output columns [lo, hi) whose tap at offset reads inside the image
 * (0 <= w * stride + offset < width), clipped to [0, out_w). */
static inline void inside_columns(long offset, long stride, long width, long out_w, long *lo,
                                  long *hi)
{
    *lo = offset < 0 ? (-offset + stride - 1) / stride : 0;
    *hi = offset < width ? (width - 1 - offset) / stride + 1 : 0;
    if (*hi > out_w) *hi = out_w;
    if (*lo > *hi) *lo = *hi;
}

/* Scratch memory of one thread in an OpenMP parallel region: `count` elements of `size` bytes
 * (at least one element). Where it cannot be allocated it is NULL and *failed, shared by the
 * team, becomes 1: the team reads it after a barrier and skips the work. */
static inline void *thread_scratch(long count, size_t size, int *failed)
{
    void *scratch = malloc((size_t)(count > 0 ? count : 1) * size);
    if (scratch == NULL) {
        #pragma omp atomic write
        *failed = 1;
    }
    return scratch;
}
