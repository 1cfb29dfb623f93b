/* The CPU decode step's kernels (bf16 tensors, fp32 arithmetic), called through ctypes by kernels/cpu_decode.py:
 *   gemv_bf16      y (M, N) = x (M, K) @ w (N, K)^T for few rows M, optionally added to a residual;
 *   rms_norm_bf16  y = bf16(x * rsqrt(mean(x^2) + eps)) * w, per row;
 *   silu_mul_bf16  y = bf16(silu(g)) * u for gu = [g | u] per row;
 *   rope_qkv_bf16  rotate-half RoPE of q and k from the packed projection, q to a buffer, k and v into the
 *                  KV cache at (slot, position) per row;
 *   attend_bf16    one query position per row against its slot's cached keys (all up to its length, or
 *                  those a mask allows), softmax in fp32;
 *   index_select_bf16  the indexer's scores (weighted ReLU of q . k over its heads) and top-k selection of many
 *                  query rows, as a 0/1 or additive mask;
 *   amx_gemv_bf16  the GEMV for 2-16 rows on AMX tiles, from a weight packed once into tiles (pack_amx in
 *                  cpu_decode.py), optionally added to a residual: at 8 rows the AVX-512 dot products are
 *                  compute-bound on 2 hyperthreads (~0.8 G dot-product instructions/s each), AMX is not.
 * Each rounds where its PyTorch twin (the CPU fast forward's F.linear / torch path) rounds to bf16.
 *
 * gemv_bf16, why: at M <= 8 PyTorch's bf16 CPU GEMM streams a weight at 7-12 GB/s on 2 cores where a plain read runs
 * at ~19: a decode step reads every weight once, so the GEMV is the step. This streams each weight row once
 * with AVX-512 BF16 dot products (_mm512_dpbf16_ps: 32 bf16 products into 16 fp32 lanes), sums in fp32 as
 * F.linear does, and rounds the sum to bf16 once (round to nearest even) or keeps it in fp32.
 * Rows of w are split over `threads` OpenMP threads (the libgomp PyTorch has loaded: one thread pool).
 * K must be a multiple of 32; x, w, y contiguous. Built and called by kernels/cpu_gemv.py. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ROWS 4   /* weight rows per block: ROWS x MB accumulators + ROWS weight vectors stay in registers */
/* software prefetch of the same bytes PREFETCH_BLOCKS blocks ahead: a block's rows are only K * 2 bytes each,
 * too short for the hardware prefetcher to ramp up; on 2 cores it took the 30-layer GEMVs at M = 1 from 23 to
 * 35 GB/s (M = 8: 7 to 11). Prefetches past the end of w are harmless (they never fault). */
#define PREFETCH_BLOCKS 2

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                               /* nearest even */
    return (uint16_t)(u >> 16);
}

/* sums[i * ROWS + r] = x[m0 + i] . w[n0 + r] for i < MB, r < nrows; MB a compile-time constant so that the
 * accumulators live in registers (a block of w is re-read from L1 by the next group of input rows) */
#define DEFINE_BLOCK(MB)                                                                                  \
static void block_##MB(const uint16_t *x, int m0, int K, const uint16_t *w, int n0, int nrows, float *sums) { \
    __m512 acc[MB][ROWS];                                                                                 \
    for (int i = 0; i < MB; i++)                                                                          \
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_setzero_ps();                                   \
    const uint16_t *wr[ROWS];                                                                             \
    for (int r = 0; r < ROWS; r++) wr[r] = w + (size_t)(n0 + (r < nrows ? r : 0)) * K;                    \
    for (int k = 0; k < K; k += 32) {                                                                     \
        __m512bh wv[ROWS];                                                                                \
        for (int r = 0; r < ROWS; r++) {                                                                  \
            wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(wr[r] + k));                              \
            _mm_prefetch((const char *)(wr[r] + k + (size_t)PREFETCH_BLOCKS * ROWS * K), _MM_HINT_T0);   \
        }                                                                                                 \
        for (int i = 0; i < MB; i++) {                                                                    \
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + (size_t)(m0 + i) * K + k));     \
            for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);            \
        }                                                                                                 \
    }                                                                                                     \
    for (int i = 0; i < MB; i++)                                                                          \
        for (int r = 0; r < ROWS; r++) sums[i * ROWS + r] = _mm512_reduce_add_ps(acc[i][r]);             \
}
DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)

static inline float f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the sums of rows m0..m0+mb-1 (mb <= 4) of x against weight rows n0..n0+nrows-1 */
static inline void sums_of(const uint16_t *x, int m0, int mb, int K, const uint16_t *w, int n0, int nrows,
                           float *sums) {
    switch (mb) {
        case 4: block_4(x, m0, K, w, n0, nrows, sums); break;
        case 3: block_3(x, m0, K, w, n0, nrows, sums); break;
        case 2: block_2(x, m0, K, w, n0, nrows, sums); break;
        default: block_1(x, m0, K, w, n0, nrows, sums); break;
    }
}

/* how a sum lands in y: bf16, fp32, or added to a bf16 residual in place, rounding as PyTorch does for
 * `h + linear(a, w)` in bf16 (the product to bf16, then the sum in fp32 rounded to bf16) */
enum { STORE_BF16 = 0, STORE_F32 = 1, ADD_BF16 = 2 };

static inline void store(void *y, size_t at, float s, int how) {
    if (how == STORE_F32) ((float *)y)[at] = s;
    else if (how == ADD_BF16) ((uint16_t *)y)[at] = to_bf16(f32(((uint16_t *)y)[at]) + f32(to_bf16(s)));
    else ((uint16_t *)y)[at] = to_bf16(s);
}

static void gemv_rows(const uint16_t *x, int M, int K, const uint16_t *w, int N, void *y, int how, int threads) {
    int nblocks = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < nblocks; b++) {
        int n0 = b * ROWS, nrows = N - n0 < ROWS ? N - n0 : ROWS;
        float sums[4 * ROWS];
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mb = M - m0 < 4 ? M - m0 : 4;
            sums_of(x, m0, mb, K, w, n0, nrows, sums);
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < nrows; r++)
                    store(y, (size_t)(m0 + i) * N + n0 + r, sums[i * ROWS + r], how);
        }
    }
}

void gemv_bf16(const uint16_t *x, int M, int K, const uint16_t *w, int N, void *y, int out_f32, int threads) {
    gemv_rows(x, M, K, w, N, y, out_f32 ? STORE_F32 : STORE_BF16, threads);
}

/* y (M, N) += bf16(x @ w^T), y read and written in place */
void gemv_add_bf16(const uint16_t *x, int M, int K, const uint16_t *w, int N, uint16_t *y, int threads) {
    gemv_rows(x, M, K, w, N, y, ADD_BF16, threads);
}

/* Row-wise kernels split their rows over `threads` threads from this many rows on (a prefill chunk); below it
 * (decode steps) one thread: waking a second one costs more than the rows take. */
#define PARALLEL_ROWS 32

/* y (M, D) = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w): F.rms_norm in fp32, rounded, times the bf16 weight. */
void rms_norm_bf16(const uint16_t *x, int M, int D, const uint16_t *w, float eps, uint16_t *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (M >= PARALLEL_ROWS)
    for (int m = 0; m < M; m++) {
        const uint16_t *xr = x + (size_t)m * D;
        float ss = 0.f;
        for (int d = 0; d < D; d++) { float v = f32(xr[d]); ss += v * v; }
        float inv = 1.f / sqrtf(ss / (float)D + eps);
        for (int d = 0; d < D; d++)
            y[(size_t)m * D + d] = to_bf16(f32(to_bf16(f32(xr[d]) * inv)) * f32(w[d]));
    }
}

/* exp(x) for 16 lanes: 2^n * 2^f, n = round(x log2 e), |f| <= 1/2, 2^f by its Taylor series to degree 7
 * (relative error < 1e-8, far below a bf16 step); x clamped to [-87, 88] (exp(-87) ~ 1.6e-38, not 0). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));   /* f ln 2 */
    static const float c[8] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040};
    __m512 p = _mm512_set1_ps(c[7]);
    for (int i = 6; i >= 0; i--) p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

/* 16 fp32 -> 16 bf16, round to nearest even (NaN stays NaN) */
static inline __m256i round16(__m512 x) {
    return (__m256i)_mm512_cvtneps_pbh(x);
}

static inline __m512 widen16(__m256i b) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* y (M, I) = bf16(silu(g)) * u for gu (M, 2I) = [g | u], each product rounded to bf16 (F.silu(g) * u in bf16).
 * I a multiple of 16 (the caller checks). */
void silu_mul_bf16(const uint16_t *gu, int M, int I, uint16_t *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (M >= PARALLEL_ROWS)
    for (int m = 0; m < M; m++)
        for (int i = 0; i < I; i += 16) {
            __m512 g = widen16(_mm256_loadu_si256((const __m256i *)(gu + (size_t)m * 2 * I + i)));
            __m512 u = widen16(_mm256_loadu_si256((const __m256i *)(gu + (size_t)m * 2 * I + I + i)));
            __m512 sg = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            __m512 prod = _mm512_mul_ps(widen16(round16(sg)), u);
            _mm256_storeu_si256((__m256i *)(y + (size_t)m * I + i), round16(prod));
        }
}

/* For each row m (one request, one position): proj (M, P) holds [q (Hq*Dh) | k (Hkv*Dh) | v (Hkv*Dh) | ...].
 * Rotate-half RoPE of q and k in fp32 with the tables cos_t = [cos | cos], sin_t = [-sin | sin] (max_len, Dh)
 * at pos[m]: r[i] = x[i] * cos_t[i] + x[i ^ half] * sin_t[i], rounded to bf16; q -> q_out (M, Hq*Dh), k and v
 * -> kc / vc (slots, max_len, Hkv, Dh) at [slot[m], pos[m]]. */
void rope_qkv_bf16(const uint16_t *proj, int M, int P, int Hq, int Hkv, int Dh, const float *cos_t,
                   const float *sin_t, const int64_t *pos, const int64_t *slot, int max_len, uint16_t *q_out,
                   uint16_t *kc, uint16_t *vc, int threads) {
    int half = Dh / 2;
    #pragma omp parallel for schedule(static) num_threads(threads) if (M >= PARALLEL_ROWS)
    for (int m = 0; m < M; m++) {
        const uint16_t *pr = proj + (size_t)m * P;
        const float *c = cos_t + (size_t)pos[m] * Dh, *s = sin_t + (size_t)pos[m] * Dh;
        size_t row = ((size_t)slot[m] * max_len + (size_t)pos[m]) * Hkv * Dh;
        for (int h = 0; h < Hq + Hkv; h++) {
            const uint16_t *xh = pr + (size_t)h * Dh;
            uint16_t *out = h < Hq ? q_out + (size_t)m * Hq * Dh + (size_t)h * Dh : kc + row + (size_t)(h - Hq) * Dh;
            for (int i = 0; i < Dh; i++) {
                int j = i < half ? i + half : i - half;
                float a = f32(xh[i]) * c[i], b = f32(xh[j]) * s[i];
                out[i] = to_bf16(a + b);
            }
        }
        memcpy(vc + row, pr + (size_t)(Hq + Hkv) * Dh, (size_t)Hkv * Dh * sizeof(uint16_t));
    }
}

/* 16 bf16 -> 16 fp32 (exact: a bf16 is the top half of an fp32) */
static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* out (M, Hq*Dh) = softmax(q k^T * scale) v for one query per row m against the keys of slot[m]: positions
 * [0, kv_len[m]) where allowed is NULL, else those with allowed[m * S + s] != 0 (S = its row stride). The
 * Hq / Hkv query heads that share kv head g (GQA) are one task, so each key and value row is read once for
 * them. Scores, softmax and the weighted sum in fp32 (AVX-512; Dh a multiple of 16 up to 256, Hq / Hkv <= 16);
 * out rounded to bf16. scratch: (M * Hq, S_max) fp32, S_max >= every kv_len. */
void attend_bf16(const uint16_t *q, int M, int Hq, int Hkv, int Dh, const uint16_t *kc, const uint16_t *vc,
                 int max_len, const int64_t *slot, const int64_t *kv_len, const uint8_t *allowed, int S,
                 float scale, uint16_t *out, float *scratch, int s_max, int threads) {
    int group = Hq / Hkv, nv = Dh / 16;
    int tasks = M * Hkv;
    long work = 0;
    for (int m = 0; m < M; m++) work += kv_len[m];
    int nt = work * Hq * Dh > 400000 ? threads : 1;   /* short contexts: one thread, no wake-up */
    #pragma omp parallel for schedule(dynamic) num_threads(nt)
    for (int t = 0; t < tasks; t++) {
        int m = t / Hkv, g = t % Hkv;
        size_t kv_row = (size_t)Hkv * Dh;
        const uint16_t *kb = kc + (size_t)slot[m] * max_len * kv_row + (size_t)g * Dh;
        const uint16_t *vb = vc + (size_t)slot[m] * max_len * kv_row + (size_t)g * Dh;
        int n = (int)kv_len[m];
        const uint8_t *ok = allowed ? allowed + (size_t)m * S : 0;
        for (int j = 0; j < group; j++) {
            int h = g * group + j;
            const uint16_t *qh = q + (size_t)m * Hq * Dh + (size_t)h * Dh;
            float *p = scratch + ((size_t)m * Hq + h) * s_max;
            __m512 qv[16];
            for (int i = 0; i < nv; i++) qv[i] = load16(qh + 16 * i);
            float mx = -INFINITY;
            for (int s = 0; s < n; s++) {
                if (ok && !ok[s]) { p[s] = -INFINITY; continue; }
                const uint16_t *ks = kb + (size_t)s * kv_row;
                __m512 d = _mm512_mul_ps(qv[0], load16(ks));
                for (int i = 1; i < nv; i++) d = _mm512_add_ps(d, _mm512_mul_ps(qv[i], load16(ks + 16 * i)));
                p[s] = _mm512_reduce_add_ps(d) * scale;
                if (p[s] > mx) mx = p[s];
            }
            /* p[s] <- exp(p[s] - mx), masked keys exactly 0 */
            __m512 mxv = _mm512_set1_ps(mx);
            int s = 0;
            for (; s + 16 <= n; s += 16) {
                __m512 x = _mm512_loadu_ps(p + s);
                __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                _mm512_storeu_ps(p + s, _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(x, mxv))));
            }
            for (; s < n; s++) p[s] = p[s] == -INFINITY ? 0.f : expf(p[s] - mx);
        }
        /* out[h] = sum_s p_h[s] v[s] / sum_h, the value row read once for the group's heads */
        __m512 acc[16][16];
        for (int j = 0; j < group; j++)
            for (int i = 0; i < nv; i++) acc[j][i] = _mm512_setzero_ps();
        const float *p0 = scratch + ((size_t)m * Hq + (size_t)g * group) * s_max;
        for (int s = 0; s < n; s++) {
            if (ok && !ok[s]) continue;
            const uint16_t *vs = vb + (size_t)s * kv_row;
            __m512 vv[16];
            for (int i = 0; i < nv; i++) vv[i] = load16(vs + 16 * i);
            for (int j = 0; j < group; j++) {
                __m512 e = _mm512_set1_ps(p0[(size_t)j * s_max + s]);
                for (int i = 0; i < nv; i++) acc[j][i] = _mm512_add_ps(acc[j][i], _mm512_mul_ps(e, vv[i]));
            }
        }
        for (int j = 0; j < group; j++) {
            const float *pj = p0 + (size_t)j * s_max;
            float sum = 0.f;
            for (int s = 0; s < n; s++) sum += pj[s];
            __m512 inv = _mm512_set1_ps(1.f / sum);
            uint16_t *o = out + (size_t)m * Hq * Dh + (size_t)(g * group + j) * Dh;
            for (int i = 0; i < nv; i++) _mm256_storeu_si256((__m256i *)(o + 16 * i), round16(_mm512_mul_ps(acc[j][i], inv)));
        }
    }
}

/* ------------------------------------------------------------------------------------------------ AMX */

/* Linux hands out AMX tile state only on request, once per process: 0 on success. */
int amx_init(void) {
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
}

typedef struct { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

#define AMX_PREFETCH_TILES 8   /* B tiles (1 KB each, contiguous) prefetched ahead of the one multiplied */

/* y (M, N) = x (M, K) @ w^T, or y += bf16(x @ w^T) when add (rounded as gemv_add_bf16). w packed as
 * (N/16, K/32, 16, 16, 2): tile (nb, kb) holds w[nb*16 + n][kb*32 + 2*kk + j] at [kk][n][j] (the AMX B layout,
 * k in pairs). M <= 64 (up to 4 accumulator tiles of 16 rows: each weight tile is loaded once for all rows),
 * N % 16 == 0, K % 32 == 0; column blocks of 16 split over the threads. */
void amx_gemv_bf16(const uint16_t *x, int M, int K, const uint16_t *wp, int N, uint16_t *y, int add, int threads) {
    int nblocks = N / 16, kblocks = K / 32, mtiles = (M + 15) / 16;
    #pragma omp parallel num_threads(threads)
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        int tail = M % 16;                       /* rows of a last, partial row tile (0: none) */
        for (int t = 0; t < mtiles; t++) {       /* C tiles 0-3: the row tiles' rows x 16 fp32 */
            cfg.rows[t] = (t == mtiles - 1 && tail) ? tail : 16;
            cfg.colsb[t] = 64;
        }
        cfg.rows[4] = 16;   cfg.colsb[4] = 64;   /* A, a full row tile: 16 x 32 bf16 */
        cfg.rows[5] = tail; cfg.colsb[5] = tail ? 64 : 0;   /* A, the partial row tile */
        cfg.rows[6] = 16;   cfg.colsb[6] = 64;   /* B: 16 k-pairs x 16 columns x 2 */
        _tile_loadconfig(&cfg);
        /* tile numbers must be immediates: one statement per row tile */
        #define AMX_ZERO(t) if (mtiles > t) _tile_zero(t)
        #define AMX_STEP(t) if (mtiles > t) {                                                              \
            if (t == mtiles - 1 && tail) { _tile_loadd(5, x + (size_t)16 * t * K + kb * 32, K * 2); _tile_dpbf16ps(t, 5, 6); } \
            else { _tile_loadd(4, x + (size_t)16 * t * K + kb * 32, K * 2); _tile_dpbf16ps(t, 4, 6); } }
        float c[64 * 16];
        #pragma omp for schedule(static)
        for (int nb = 0; nb < nblocks; nb++) {
            const uint16_t *wb = wp + (size_t)nb * kblocks * 512;
            AMX_ZERO(0); AMX_ZERO(1); AMX_ZERO(2); AMX_ZERO(3);
            for (int kb = 0; kb < kblocks; kb++) {
                const char *ahead = (const char *)(wb + (size_t)(kb + AMX_PREFETCH_TILES) * 512);
                for (int line = 0; line < 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
                _tile_loadd(6, wb + (size_t)kb * 512, 64);
                AMX_STEP(0); AMX_STEP(1); AMX_STEP(2); AMX_STEP(3);
            }
            if (mtiles > 0) _tile_stored(0, c, 64);
            if (mtiles > 1) _tile_stored(1, c + 16 * 16, 64);
            if (mtiles > 2) _tile_stored(2, c + 32 * 16, 64);
            if (mtiles > 3) _tile_stored(3, c + 48 * 16, 64);
            for (int m = 0; m < M; m++)
                for (int n = 0; n < 16; n++) {
                    size_t at = (size_t)m * N + nb * 16 + n;
                    y[at] = add ? to_bf16(f32(y[at]) + f32(to_bf16(c[m * 16 + n]))) : to_bf16(c[m * 16 + n]);
                }
        }
        _tile_release();
    }
}

/* fp32 -> uint32 in the same order (larger float, larger key): flip every bit of a negative, the sign of the rest */
static inline uint32_t order_key(float f) {
    f = f + 0.f;   /* -0 -> +0: equal scores are one key */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The k-th largest of key[0, n) (1 <= k <= n) by radix select from the top: an 11-bit histogram of every key,
 * then 8, 8 and 5 bits over the few keys left in the bucket holding the k-th (cand: n slots). */
static uint32_t kth_largest(const uint32_t *key, int n, int k, uint32_t *cand) {
    static const int shifts[4] = {21, 13, 5, 0}, widths[4] = {11, 8, 8, 5};
    int count[2048];
    memset(count, 0, sizeof(count));
    for (int s = 0; s < n; s++) count[key[s] >> 21]++;
    int b = 2047;
    while (count[b] < k) { k -= count[b]; b--; }
    uint32_t prefix = (uint32_t)b << 21;
    int c = 0;
    for (int s = 0; s < n; s++) if ((key[s] >> 21) == (uint32_t)b) cand[c++] = key[s];
    for (int pass = 1; pass < 4; pass++) {
        int sh = shifts[pass], bins = 1 << widths[pass];
        uint32_t low = (uint32_t)bins - 1;
        memset(count, 0, (size_t)bins * sizeof(int));
        for (int i = 0; i < c; i++) count[(cand[i] >> sh) & low]++;
        b = bins - 1;
        while (count[b] < k) { k -= count[b]; b--; }
        prefix |= (uint32_t)b << sh;
        int kept = 0;
        for (int i = 0; i < c; i++) if (((cand[i] >> sh) & low) == (uint32_t)b) cand[kept++] = cand[i];
        c = kept;
    }
    return prefix;
}

/* The indexer's selection for M query rows, one call per F layer: row m's scores over keys s < n_visible[m],
 *   score[s] = sum_h w[m, h] * relu(logits[m, h, s])     (fp32, h in order, products then sums as the twin),
 * and its top k: every key with a score above the k-th largest, then keys equal to it from the lowest index
 * until k are chosen (a row with n_visible <= k selects every visible key). Keys s >= n_visible[m] are never
 * chosen. out (M, S): additive == 0 -> uint8 1/0 (chosen or not); additive == 1 -> bf16 0 / -inf (the mask
 * flash attention adds). The k-th largest by radix select on the scores' order keys (kth_largest): no sort,
 * the same answer however many keys tie. logits (M, Hi, S) bf16, w (M, Hi) fp32. */
void index_select_bf16(const uint16_t *logits, const float *w, int M, int Hi, int S, const int64_t *n_visible,
                       int k, void *out, int additive, int threads) {
    int nt = (long)M * S * Hi > 200000 ? threads : 1;
    #pragma omp parallel num_threads(nt)
    {
        uint32_t *key = (uint32_t *)malloc((size_t)(S + 16) * sizeof(uint32_t));
        uint32_t *cand = (uint32_t *)malloc((size_t)(S + 16) * sizeof(uint32_t));
        const __m256i neg_inf = _mm256_set1_epi16((short)0xFF80), zero = _mm256_setzero_si256();
        const __m128i one = _mm_set1_epi8(1);
        #pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            int n = (int)(n_visible[m] < S ? n_visible[m] : S);
            uint8_t *ob = (uint8_t *)out + (size_t)m * S;
            uint16_t *oa = (uint16_t *)out + (size_t)m * S;
            uint32_t kth = 0;
            int ties = 0;
            if (n > k) {
                const uint16_t *lr = logits + (size_t)m * Hi * S;
                const float *wr = w + (size_t)m * Hi;
                int s = 0;
                for (; s + 16 <= n; s += 16) {
                    __m512 acc = _mm512_mul_ps(_mm512_max_ps(load16(lr + s), _mm512_setzero_ps()), _mm512_set1_ps(wr[0]));
                    for (int h = 1; h < Hi; h++)
                        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_max_ps(load16(lr + (size_t)h * S + s),
                                                                             _mm512_setzero_ps()), _mm512_set1_ps(wr[h])));
                    /* -0 -> +0 (equal scores, one key), then the order key: flip a negative's bits, set a positive's sign */
                    __m512i u = _mm512_castps_si512(_mm512_add_ps(acc, _mm512_setzero_ps()));
                    __mmask16 neg = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
                    u = _mm512_mask_xor_epi32(_mm512_or_si512(u, _mm512_set1_epi32((int)0x80000000)), neg, u,
                                              _mm512_set1_epi32(-1));
                    _mm512_storeu_si512(key + s, u);
                }
                for (; s < n; s++) {
                    float acc = fmaxf(f32(lr[s]), 0.f) * wr[0];
                    for (int h = 1; h < Hi; h++) acc = acc + fmaxf(f32(lr[(size_t)h * S + s]), 0.f) * wr[h];
                    key[s] = order_key(acc);
                }
                kth = kth_largest(key, n, k, cand);
                int above = 0;
                for (s = 0; s < n; s++) above += key[s] > kth;
                ties = k - above;             /* keys equal to the k-th largest to take, lowest index first */
            }
            for (int s = 0; s < S; s += 16) {
                int lanes = S - s < 16 ? S - s : 16;
                __mmask16 live = (__mmask16)((1u << lanes) - 1), vis = 0;
                if (s < n) vis = n - s >= 16 ? 0xFFFF : (__mmask16)((1u << (n - s)) - 1);
                __mmask16 chosen = vis;
                if (n > k && vis) {
                    __m512i kv = _mm512_maskz_loadu_epi32(vis, key + s), t = _mm512_set1_epi32((int)kth);
                    chosen = _mm512_mask_cmpgt_epu32_mask(vis, kv, t);
                    __mmask16 eq = _mm512_mask_cmpeq_epu32_mask(vis, kv, t);
                    while (eq && ties > 0) {   /* the lowest-index ties first */
                        __mmask16 low = eq & (__mmask16)(-(int)eq);
                        chosen |= low; eq ^= low; ties--;
                    }
                }
                if (additive) _mm256_mask_storeu_epi16(oa + s, live, _mm256_mask_blend_epi16(chosen, neg_inf, zero));
                else _mm_mask_storeu_epi8(ob + s, live, _mm_maskz_mov_epi8(chosen, one));
            }
        }
        free(key);
        free(cand);
    }
}
