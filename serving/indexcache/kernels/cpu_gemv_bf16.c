/* y (M, N) = x (M, K) @ w (N, K)^T for few rows M (CPU decode), bf16 in, fp32 accumulation, bf16 or fp32 out.
 *
 * Why: at M <= 8 PyTorch's bf16 CPU GEMM streams a weight at 7-12 GB/s on 2 cores where a plain read runs
 * at ~19: a decode step reads every weight once, so the GEMV is the step. This streams each weight row once
 * with AVX-512 BF16 dot products (_mm512_dpbf16_ps: 32 bf16 products into 16 fp32 lanes), sums in fp32 as
 * F.linear does, and rounds the sum to bf16 once (round to nearest even) or keeps it in fp32.
 * Rows of w are split over `threads` OpenMP threads (the libgomp PyTorch has loaded: one thread pool).
 * K must be a multiple of 32; x, w, y contiguous. Built and called by kernels/cpu_gemv.py. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ROWS 4   /* weight rows per block: ROWS x MB accumulators + ROWS weight vectors stay in registers */

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                               /* nearest even */
    return (uint16_t)(u >> 16);
}

static inline void store(void *y, size_t at, float s, int out_f32) {
    if (out_f32) ((float *)y)[at] = s;
    else ((uint16_t *)y)[at] = to_bf16(s);
}

/* rows n0..n0+nrows-1 of y for input rows m0..m0+MB-1; MB a compile-time constant so that the
 * accumulators live in registers (a block of w is re-read from L1 by the next group of input rows) */
#define DEFINE_BLOCK(MB)                                                                                  \
static void block_##MB(const uint16_t *x, int m0, int K, const uint16_t *w, int n0, int nrows, int N,      \
                       void *y, int out_f32) {                                                            \
    __m512 acc[MB][ROWS];                                                                                 \
    for (int i = 0; i < MB; i++)                                                                          \
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_setzero_ps();                                   \
    const uint16_t *wr[ROWS];                                                                             \
    for (int r = 0; r < ROWS; r++) wr[r] = w + (size_t)(n0 + (r < nrows ? r : 0)) * K;                    \
    for (int k = 0; k < K; k += 32) {                                                                     \
        __m512bh wv[ROWS];                                                                                \
        for (int r = 0; r < ROWS; r++) wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(wr[r] + k));  \
        for (int i = 0; i < MB; i++) {                                                                    \
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + (size_t)(m0 + i) * K + k));     \
            for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);            \
        }                                                                                                 \
    }                                                                                                     \
    for (int i = 0; i < MB; i++)                                                                          \
        for (int r = 0; r < nrows; r++)                                                                   \
            store(y, (size_t)(m0 + i) * N + n0 + r, _mm512_reduce_add_ps(acc[i][r]), out_f32);            \
}
DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)

void gemv_bf16(const uint16_t *x, int M, int K, const uint16_t *w, int N, void *y, int out_f32, int threads) {
    int nblocks = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < nblocks; b++) {
        int n0 = b * ROWS, nrows = N - n0 < ROWS ? N - n0 : ROWS;
        int m0 = 0;
        for (; M - m0 >= 4; m0 += 4) block_4(x, m0, K, w, n0, nrows, N, y, out_f32);
        switch (M - m0) {
            case 3: block_3(x, m0, K, w, n0, nrows, N, y, out_f32); break;
            case 2: block_2(x, m0, K, w, n0, nrows, N, y, out_f32); break;
            case 1: block_1(x, m0, K, w, n0, nrows, N, y, out_f32); break;
        }
    }
}
