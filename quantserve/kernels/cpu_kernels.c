/* quantserve CPU kernels (x86 AVX2 + FMA, OpenMP), built once per instruction set: the avx512
 * build (F/BW/VL + VNNI) takes the VNNI paths below, the avx2 build the AVX2 ones. Integer
 * sums are exact either way, so both builds give bit-identical results. Float-weight linears run
 * on zmm tiles in the avx512 build and ymm in the avx2 one, with the same FMA chain per output.
 *
 * Each result row is computed in an order that does not depend on how many rows are in the
 * batch, so a request gets bit-identical numbers alone or batched.
 *
 * Weight and cache types (wtype / ctype): 0 = float32, 1 = bfloat16 (upper half of a float32),
 * 2 = float16 (IEEE half, converted with F16C), 3 = bf16 pairs (bf16 weights x bf16-rounded
 * activations with vdpbf16ps; avx512 build on CPUs with AVX512-BF16 only, see qs_has_bf16_dot).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_PAIRS = 3 };

static inline __m256 load8(const void *w, int wtype, long idx) {
    if (wtype == W_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + idx));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (wtype == W_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + idx)));
    return _mm256_loadu_ps((const float *)w + idx);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) for 8 lanes: Cephes' range reduction x = n ln2 + r and degree-5 polynomial (~1 ulp). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* Linear layers run on weights packed in panels of 16 output rows, k-major inside a panel:
 * packed[p][k][j] = w[16 p + j][k]  (rows past N are zero). For one 8-wide k step the kernel loads
 * 16 consecutive weights = one output lane each, and every output element accumulates over k
 * in order in its own lane: the same numbers whatever the tile shape or batch size. */
#define NR 16

#ifndef __AVX512F__
static inline void store_tile(__m256 a0, __m256 a1, float *y, int nvalid, const float *bias) {
    float tmp[NR];
    _mm256_storeu_ps(tmp, a0);
    _mm256_storeu_ps(tmp + 8, a1);
    for (int j = 0; j < nvalid; j++) y[j] = tmp[j] + (bias ? bias[j] : 0.0f);
}

#define FMA_ROW(i)                                                                                  \
    if (MT > i) {                                                                                  \
        __m256 xb = _mm256_broadcast_ss(x + (long)(i) * K + k);                                    \
        a##i##0 = _mm256_fmadd_ps(xb, w0, a##i##0);                                                \
        a##i##1 = _mm256_fmadd_ps(xb, w1, a##i##1);                                                \
    }
#define STORE_ROW(i)                                                                                \
    if (MT > i) store_tile(a##i##0, a##i##1, y + (long)(i) * N + n0, nvalid, bias ? bias + n0 : NULL);

/* MT (1..6) rows of x against panel p; accumulators live in registers (12 + 2 weights + 1). */
static inline __attribute__((always_inline)) void rows_x_panel(const int MT, const int WT, const float *x,
                                                               int K, const void *w, long p, int N,
                                                               const float *bias, float *y) {
    __m256 z = _mm256_setzero_ps();
    __m256 a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z, a40 = z, a41 = z,
           a50 = z, a51 = z;
    const long base = p * (long)K * NR;
    for (int k = 0; k < K; k++) {
        __m256 w0 = load8(w, WT, base + (long)k * NR), w1 = load8(w, WT, base + (long)k * NR + 8);
        FMA_ROW(0) FMA_ROW(1) FMA_ROW(2) FMA_ROW(3) FMA_ROW(4) FMA_ROW(5)
    }
    long n0 = p * NR;
    int nvalid = N - n0 < NR ? (int)(N - n0) : NR;
    STORE_ROW(0) STORE_ROW(1) STORE_ROW(2) STORE_ROW(3) STORE_ROW(4) STORE_ROW(5)
}

/* One row of x against 4 panels: 8 independent accumulator chains hide FMA latency. */
static inline __attribute__((always_inline)) void row_x_4panels(const int WT, const float *x, int K,
                                                                const void *w, long p0, int N,
                                                                const float *bias, float *y) {
    __m256 z = _mm256_setzero_ps();
    __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z;
    const long stride = (long)K * NR, base = p0 * stride;
    for (int k = 0; k < K; k++) {
        __m256 xb = _mm256_broadcast_ss(x + k);
        long o = base + (long)k * NR;
        c00 = _mm256_fmadd_ps(xb, load8(w, WT, o), c00);
        c01 = _mm256_fmadd_ps(xb, load8(w, WT, o + 8), c01);
        c10 = _mm256_fmadd_ps(xb, load8(w, WT, o + stride), c10);
        c11 = _mm256_fmadd_ps(xb, load8(w, WT, o + stride + 8), c11);
        c20 = _mm256_fmadd_ps(xb, load8(w, WT, o + 2 * stride), c20);
        c21 = _mm256_fmadd_ps(xb, load8(w, WT, o + 2 * stride + 8), c21);
        c30 = _mm256_fmadd_ps(xb, load8(w, WT, o + 3 * stride), c30);
        c31 = _mm256_fmadd_ps(xb, load8(w, WT, o + 3 * stride + 8), c31);
    }
    __m256 acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int q = 0; q < 4; q++) {
        long n0 = (p0 + q) * NR;
        int nvalid = N - n0 < NR ? (int)(N - n0) : NR;
        store_tile(acc[q][0], acc[q][1], y + n0, nvalid, bias ? bias + n0 : NULL);
    }
}

#define DEFINE_MICROS(WT)                                                                           \
    static void micro_4p_##WT(const float *x, int K, const void *w, long p, int N, const float *b,  \
                              float *y) { row_x_4panels(WT, x, K, w, p, N, b, y); }                 \
    static void micro_1_##WT(const float *x, int K, const void *w, long p, int N, const float *b,   \
                             float *y) { rows_x_panel(1, WT, x, K, w, p, N, b, y); }                \
    static void micro_2_##WT(const float *x, int K, const void *w, long p, int N, const float *b,   \
                             float *y) { rows_x_panel(2, WT, x, K, w, p, N, b, y); }                \
    static void micro_3_##WT(const float *x, int K, const void *w, long p, int N, const float *b,   \
                             float *y) { rows_x_panel(3, WT, x, K, w, p, N, b, y); }                \
    static void micro_4_##WT(const float *x, int K, const void *w, long p, int N, const float *b,   \
                             float *y) { rows_x_panel(4, WT, x, K, w, p, N, b, y); }                \
    static void micro_5_##WT(const float *x, int K, const void *w, long p, int N, const float *b,   \
                             float *y) { rows_x_panel(5, WT, x, K, w, p, N, b, y); }                \
    static void micro_6_##WT(const float *x, int K, const void *w, long p, int N, const float *b,   \
                             float *y) { rows_x_panel(6, WT, x, K, w, p, N, b, y); }
DEFINE_MICROS(0)
DEFINE_MICROS(1)
DEFINE_MICROS(2)

typedef void (*micro_fn)(const float *, int, const void *, long, int, const float *, float *);
/* [wtype][rows]; column 0 is the 1-row, 4-panel kernel */
static const micro_fn MICRO[3][7] = {
    {micro_4p_0, micro_1_0, micro_2_0, micro_3_0, micro_4_0, micro_5_0, micro_6_0},
    {micro_4p_1, micro_1_1, micro_2_1, micro_3_1, micro_4_1, micro_5_1, micro_6_1},
    {micro_4p_2, micro_1_2, micro_2_2, micro_3_2, micro_4_2, micro_5_2, micro_6_2},
};

/* wtype 0-2 on ymm: x [M, K], packed [ceil(N / 16), K, 16], bias [N] or NULL -> y [M, N]. */
static void linear_floats(const float *x, int M, int K, const void *packed, int wtype, const float *bias,
                          float *y, int N, int nthreads) {
    long npanels = (N + NR - 1) / NR;
    if (M == 1) {
        long ngroups = (npanels + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (long g = 0; g < ngroups; g++) {
            long p0 = g * 4;
            if (p0 + 4 <= npanels) MICRO[wtype][0](x, K, packed, p0, N, bias, y);
            else
                for (long p = p0; p < npanels; p++) MICRO[wtype][1](x, K, packed, p, N, bias, y);
        }
        return;
    }
    /* Rows of x in blocks that stay in L2 (~192 KB) while every panel passes over them. */
    int mb = (int)(49152 / K) / 6 * 6;
    if (mb < 6) mb = 6;
#pragma omp parallel num_threads(nthreads)
    for (int mstart = 0; mstart < M; mstart += mb) {
        int mend = mstart + mb < M ? mstart + mb : M;
#pragma omp for schedule(static)
        for (long p = 0; p < npanels; p++) {
            for (int m0 = mstart; m0 < mend; m0 += 6) {
                int mt = mend - m0 < 6 ? mend - m0 : 6;
                MICRO[wtype][mt](x + (long)m0 * K, K, packed, p, N, bias, y + (long)m0 * N);
            }
        }
    }
}
#else
/* avx512 build: the same panels, one zmm = 16 outputs of one panel per k. Every output element is
 * still one chain of FMAs over k in order from zero, then + bias: bit-identical to the ymm tiles. */
#define F_ROWS 12    /* prefill tile: 12 rows x 2 panels = 24 of the 32 zmm as accumulators */
#define F_GEMV 4     /* decode: 1 row x 4 panels */

static inline __m512 load16(const void *w, int wtype, long idx) {
    if (wtype == W_BF16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + idx));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (wtype == W_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + idx)));
    return _mm512_loadu_ps((const float *)w + idx);
}

/* y[n0 .. n0 + 16) = acc + bias (or + 0.0f, as store_tile: -0 becomes +0), clipped to N. */
static inline __attribute__((always_inline)) void store16(__m512 acc, float *y, long n0, int N,
                                                          const float *bias) {
    __mmask16 m = N - n0 >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
    acc = _mm512_add_ps(acc, bias ? _mm512_maskz_loadu_ps(m, bias + n0) : _mm512_setzero_ps());
    _mm512_mask_storeu_ps(y + n0, m, acc);
}

/* MT rows of x [MT, K] against NP panels from p; y: [MT, N]. */
static inline __attribute__((always_inline)) void float_tile(const int MT, const int NP, const int WT,
                                                             const float *x, int K, const void *w, long p,
                                                             int N, const float *bias, float *y) {
    const long stride = (long)K * NR;
    __m512 acc[F_ROWS][F_GEMV];
#pragma GCC unroll 12
    for (int t = 0; t < MT; t++)
#pragma GCC unroll 4
        for (int q = 0; q < NP; q++) acc[t][q] = _mm512_setzero_ps();
    for (long k = 0; k < K; k++) {
        __m512 wv[F_GEMV];
#pragma GCC unroll 4
        for (int q = 0; q < NP; q++) wv[q] = load16(w, WT, (p + q) * stride + k * NR);
#pragma GCC unroll 12
        for (int t = 0; t < MT; t++) {
            __m512 xb = _mm512_set1_ps(x[t * (long)K + k]);
#pragma GCC unroll 4
            for (int q = 0; q < NP; q++) acc[t][q] = _mm512_fmadd_ps(xb, wv[q], acc[t][q]);
        }
    }
#pragma GCC unroll 12
    for (int t = 0; t < MT; t++)
#pragma GCC unroll 4
        for (int q = 0; q < NP; q++) store16(acc[t][q], y + (long)t * N, (p + q) * NR, N, bias);
}

typedef void (*float_fn)(const float *, int, const void *, long, int, const float *, float *);
#define FLOAT_TILE(W, T, P)                                                                           \
    static void ftile_##W##_##T##_##P(const float *x, int K, const void *w, long p, int N, const float *b, \
                                      float *y) { float_tile(T, P, W, x, K, w, p, N, b, y); }
#define FLOAT_ROWS(W, P)                                                                              \
    FLOAT_TILE(W, 1, P) FLOAT_TILE(W, 2, P) FLOAT_TILE(W, 3, P) FLOAT_TILE(W, 4, P) FLOAT_TILE(W, 5, P) \
    FLOAT_TILE(W, 6, P) FLOAT_TILE(W, 7, P) FLOAT_TILE(W, 8, P) FLOAT_TILE(W, 9, P) FLOAT_TILE(W, 10, P) \
    FLOAT_TILE(W, 11, P) FLOAT_TILE(W, 12, P)
#define FLOAT_TILES(W) FLOAT_ROWS(W, 1) FLOAT_ROWS(W, 2) FLOAT_TILE(W, 1, 4)
FLOAT_TILES(0)
FLOAT_TILES(1)
FLOAT_TILES(2)
#define FLOAT_TABLE(W, P)                                                                             \
    {ftile_##W##_1_##P, ftile_##W##_2_##P, ftile_##W##_3_##P, ftile_##W##_4_##P, ftile_##W##_5_##P,      \
     ftile_##W##_6_##P, ftile_##W##_7_##P, ftile_##W##_8_##P, ftile_##W##_9_##P, ftile_##W##_10_##P,     \
     ftile_##W##_11_##P, ftile_##W##_12_##P}
/* [wtype][panels - 1][rows - 1] */
static const float_fn FTILE[3][2][F_ROWS] = {{FLOAT_TABLE(0, 1), FLOAT_TABLE(0, 2)},
                                             {FLOAT_TABLE(1, 1), FLOAT_TABLE(1, 2)},
                                             {FLOAT_TABLE(2, 1), FLOAT_TABLE(2, 2)}};
static const float_fn FGEMV[3] = {ftile_0_1_4, ftile_1_1_4, ftile_2_1_4};

/* wtype 0-2 on zmm: x [M, K], packed [ceil(N / 16), K, 16], bias [N] or NULL -> y [M, N]. */
static void linear_floats(const float *x, int M, int K, const void *packed, int wtype, const float *bias,
                          float *y, int N, int nthreads) {
    const long npanels = (N + NR - 1) / NR;
    if (M == 1) {    /* thread t takes panels [t P / T, (t + 1) P / T), 4 at a time, then 2, then 1 */
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int t = 0; t < nthreads; t++) {
            long p = npanels * t / nthreads, end = npanels * (t + 1) / nthreads;
            for (; p + F_GEMV <= end; p += F_GEMV) FGEMV[wtype](x, K, packed, p, N, bias, y);
            for (; p + 2 <= end; p += 2) FTILE[wtype][1][0](x, K, packed, p, N, bias, y);
            for (; p < end; p++) FTILE[wtype][0][0](x, K, packed, p, N, bias, y);
        }
        return;
    }
    /* Rows of x in blocks that stay in L2 (~512 KB) while every pair of panels passes over them. */
    int mb = (int)(131072 / K) / F_ROWS * F_ROWS;
    if (mb < 2 * F_ROWS) mb = 2 * F_ROWS;
#pragma omp parallel num_threads(nthreads)
    for (int mstart = 0; mstart < M; mstart += mb) {
        int mend = mstart + mb < M ? mstart + mb : M;
#pragma omp for schedule(static)
        for (long p = 0; p < npanels; p += 2)
            for (int m0 = mstart; m0 < mend; m0 += F_ROWS) {
                int mt = mend - m0 < F_ROWS ? mend - m0 : F_ROWS;
                FTILE[wtype][p + 1 < npanels][mt - 1](x + (long)m0 * K, K, packed, p, N, bias, y + (long)m0 * N);
            }
    }
}
#endif

/* ---- wtype 3, "bf16 pairs": bf16 weights x bf16-rounded activations (vdpbf16ps) ------------
 * Weights [ceil(N / 16), K / 2, 16, 2] bfloat16: 32-bit lane j of pair kk holds w[16 p + j][2 kk]
 * and w[16 p + j][2 kk + 1], so one 512-bit load feeds vdpbf16ps for 16 outputs x 2 k. Each row
 * of x is rounded to bf16 (nearest even) once per call. Every output element sums in fp32 in its
 * own lane, one chain, pairs in order: the same numbers whatever the tile or the batch size.
 * avx512bf16 is not in the avx512 build's flags (some AVX-512 CPUs lack it), so these functions
 * carry it as a target attribute; Python uses them only where /proc/cpuinfo has avx512_bf16. */
#ifdef __AVX512F__
#define BF16_DOT 1
#define BF16 __attribute__((target("avx512bf16")))
#define PAIR_ROWS 12     /* prefill tile: 12 rows x 2 panels = 24 of the 32 zmm as accumulators */
#define PAIR_GEMV 4      /* decode: 1 row x 4 panels, 4 independent chains per k pair */

/* n floats (n even) -> n / 2 pairs of bf16, round to nearest even. */
static BF16 void round_bf16(const float *x, long n, uint32_t *out) {
    long i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));    /* x[i] low */
        _mm512_storeu_si512(out + i / 2, (__m512i)b);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(out + i / 2, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* y[n0 .. n0 + 16) = acc (+ bias), clipped to N. */
static inline __attribute__((always_inline)) void store_panel(__m512 acc, float *y, long n0, int N,
                                                              const float *bias) {
    __mmask16 m = N - n0 >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
    if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, bias + n0));
    _mm512_mask_storeu_ps(y + n0, m, acc);
}

/* MT rows of bf16 pairs xb [MT, K/2] against NP panels from p; y: [MT, N]. */
static inline __attribute__((always_inline)) BF16 void pairs_tile(const int MT, const int NP, const uint32_t *xb,
                                                                  int K, const uint16_t *w, long p, int N,
                                                                  const float *bias, float *y) {
    const long K2 = K / 2, stride = K2 * 32;           /* bf16 per panel */
    const uint16_t *wp = w + p * stride;
    __m512 acc[PAIR_ROWS][PAIR_GEMV];
#pragma GCC unroll 12
    for (int t = 0; t < MT; t++)
#pragma GCC unroll 4
        for (int q = 0; q < NP; q++) acc[t][q] = _mm512_setzero_ps();
    for (long kk = 0; kk < K2; kk++) {
        __m512bh wv[PAIR_GEMV];
#pragma GCC unroll 4
        for (int q = 0; q < NP; q++) wv[q] = (__m512bh)_mm512_loadu_si512(wp + q * stride + kk * 32);
#pragma GCC unroll 12
        for (int t = 0; t < MT; t++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xb[t * K2 + kk]);     /* the pair x[2kk], x[2kk+1] */
#pragma GCC unroll 4
            for (int q = 0; q < NP; q++) acc[t][q] = _mm512_dpbf16_ps(acc[t][q], xv, wv[q]);
        }
    }
#pragma GCC unroll 12
    for (int t = 0; t < MT; t++)
#pragma GCC unroll 4
        for (int q = 0; q < NP; q++) store_panel(acc[t][q], y + (long)t * N, (p + q) * 16, N, bias);
}

typedef void (*pairs_fn)(const uint32_t *, int, const uint16_t *, long, int, const float *, float *);
#define PAIRS_TILE(T, P)                                                                              \
    static BF16 void pairs_##T##_##P(const uint32_t *x, int K, const uint16_t *w, long p, int N,       \
                                     const float *b, float *y) { pairs_tile(T, P, x, K, w, p, N, b, y); }
#define PAIRS_ROWS(P)                                                                                 \
    PAIRS_TILE(1, P) PAIRS_TILE(2, P) PAIRS_TILE(3, P) PAIRS_TILE(4, P) PAIRS_TILE(5, P) PAIRS_TILE(6, P) \
    PAIRS_TILE(7, P) PAIRS_TILE(8, P) PAIRS_TILE(9, P) PAIRS_TILE(10, P) PAIRS_TILE(11, P) PAIRS_TILE(12, P)
PAIRS_ROWS(1)
PAIRS_ROWS(2)
PAIRS_TILE(1, 4)
/* [panels - 1][rows - 1] */
static const pairs_fn PAIRS[2][PAIR_ROWS] = {
    {pairs_1_1, pairs_2_1, pairs_3_1, pairs_4_1, pairs_5_1, pairs_6_1, pairs_7_1, pairs_8_1, pairs_9_1,
     pairs_10_1, pairs_11_1, pairs_12_1},
    {pairs_1_2, pairs_2_2, pairs_3_2, pairs_4_2, pairs_5_2, pairs_6_2, pairs_7_2, pairs_8_2, pairs_9_2,
     pairs_10_2, pairs_11_2, pairs_12_2}};

/* One row (decode): thread t takes panels [t P / T, (t + 1) P / T), 4 at a time, then 2, then 1. */
static BF16 void gemv_pairs(const uint32_t *xb, int K, const uint16_t *w, const float *bias, float *y, int N,
                            int nthreads) {
    const long npanels = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int t = 0; t < nthreads; t++) {
        long p = npanels * t / nthreads, end = npanels * (t + 1) / nthreads;
        for (; p + PAIR_GEMV <= end; p += PAIR_GEMV) pairs_1_4(xb, K, w, p, N, bias, y);
        for (; p + 2 <= end; p += 2) pairs_1_2(xb, K, w, p, N, bias, y);
        for (; p < end; p++) pairs_1_1(xb, K, w, p, N, bias, y);
    }
}

/* M rows: x rounded in parallel, then blocks of rows whose bf16 copy stays in L2 (512 KB, at least
 * 48 rows: fewer passes over weights that live in L3) while every pair of panels passes over them. */
static BF16 void gemm_pairs(const float *x, uint32_t *xb, int M, int K, const uint16_t *w, const float *bias,
                            float *y, int N, int nthreads) {
    const long npanels = (N + 15) / 16, K2 = K / 2;
    int mb = 262144 / K / PAIR_ROWS * PAIR_ROWS;
    if (mb < 4 * PAIR_ROWS) mb = 4 * PAIR_ROWS;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) round_bf16(x + (long)m * K, K, xb + m * K2);
        for (int mstart = 0; mstart < M; mstart += mb) {
            int mend = mstart + mb < M ? mstart + mb : M;
#pragma omp for schedule(static)
            for (long p = 0; p < npanels; p += 2)
                for (int m0 = mstart; m0 < mend; m0 += PAIR_ROWS) {
                    int mt = mend - m0 < PAIR_ROWS ? mend - m0 : PAIR_ROWS;
                    PAIRS[p + 1 < npanels][mt - 1](xb + m0 * K2, K, w, p, N, bias, y + (long)m0 * N);
                }
        }
    }
}

/* x: [M, K] float32 (K even); w: [ceil(N / 16), K / 2, 16, 2] bf16; bias: [N] or NULL; y: [M, N]. */
static BF16 void linear_pairs(const float *x, int M, int K, const uint16_t *w, const float *bias, float *y,
                              int N, int nthreads) {
    uint32_t small[4096] __attribute__((aligned(64)));        /* decode rows: no allocation */
    const size_t bytes = (size_t)M * K * sizeof(uint16_t);
    uint32_t *xb = bytes <= sizeof(small) ? small : aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (M == 1) {
        round_bf16(x, K, xb);
        gemv_pairs(xb, K, w, bias, y, N, nthreads);
    } else {
        gemm_pairs(x, xb, M, K, w, bias, y, N, nthreads);
    }
    if (xb != small) free(xb);
}
#else
#define BF16_DOT 0
#endif

/* 1 where this build has the wtype 3 (bf16 pairs) kernels; the CPU must also have avx512_bf16. */
int qs_has_bf16_dot(void) { return BF16_DOT; }

/* x: [M, K] float32; packed: [ceil(N / 16), K, 16] (wtype; wtype 3: [ceil(N / 16), K / 2, 16, 2]);
 * bias: [N] or NULL; y: [M, N]. */
void qs_linear(const float *x, int M, int K, const void *packed, int wtype, const float *bias,
               float *y, int N, int nthreads) {
    if (wtype == W_PAIRS) {
#if BF16_DOT
        linear_pairs(x, M, K, packed, bias, y, N, nthreads);
#else
        for (long i = 0; i < (long)M * N; i++) y[i] = NAN;       /* no bf16 pairs in this build */
#endif
        return;
    }
    linear_floats(x, M, K, packed, wtype, bias, y, N, nthreads);
}

/* Integer weights (W4A8 / W8A8, as llama.cpp's Q4 x Q8_0): each row of x is quantized on the fly
 * to int8 in blocks of 32 (scale = max|x| / 127), and the weight codes meet it in integer dot
 * products (AVX2 maddubs); each 32-block's int32 sum becomes float once. Panels of 8 output rows:
 *   4-bit: [P, K/8, 8 rows, 4 bytes], byte b of row r = code[k + b] | code[k + 4 + b] << 4;
 *   8-bit: [P, K/4, 8 rows, 4 bytes], byte b of row r = code[k + b] - 128 (signed).
 * Per (panel, group): scales[p][g][8] and mins[p][g][8] in float16, weight = scale * code + min (for 8-bit
 * the min includes the +128). The min term multiplies the sum of the *quantized* activations, so
 * the activation rounding error only meets (code - zero), the centred weight, as in
 * dequantize-then-matmul. A row's numbers never depend on the other rows of the batch. */
#define QR 8
#define QB 32

typedef struct {
    int8_t *q;           /* [M, K] */
    float *d;            /* [M, K/32] block scales */
    float *s;            /* [M, K/32] block sums of the quantized x, d * sum(q) */
} QuantRows;

static void quantize_rows(const float *x, int M, int K, QuantRows *r, int nthreads) {
    const int nb = K / QB;
    const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M > 4)
    for (long i = 0; i < (long)M * nb; i++) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + i * QB + j * 8);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        __m256i q[4];                              /* round to nearest even, |q| <= 127 */
        for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(r->q + i * QB), packed);
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, sum);
        int total = 0;
        for (int j = 0; j < 8; j++) total += lanes[j];
        r->d[i] = top / 127.0f;
        r->s[i] = r->d[i] * (float)total;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
/* acc + the sums of 4 adjacent u8 x s8 products per int32 lane: one vpdpbusd */
#define DOT4(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#else
#define VNNI 0
#define DOT4(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif

/* int32 sums of one 32-block for MT rows of x against the 8 rows at w. No sum saturates on
 * either path (|code| <= 128, |x| <= 127), so VNNI and AVX2 give the same integers. */
static inline __attribute__((always_inline)) void block_dots(const int BITS, const int MT, const uint8_t *w,
                                                             const int8_t *xq, long K, __m256i *acc) {
    for (int t = 0; t < MT; t++) acc[t] = _mm256_setzero_si256();
    if (BITS == 4) {
        const __m256i mask = _mm256_set1_epi8(0x0F);
#if !VNNI
        /* 8 k per step in int16; 4 steps stay within int16, then one widening madd */
        __m256i s16[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
#endif
        for (int s = 0; s < 4; s++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + s * 32));
            __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            for (int t = 0; t < MT; t++) {
                const int8_t *xp = xq + t * K + s * 8;
                __m256i xa = _mm256_set1_epi32(*(const int32_t *)xp), xb = _mm256_set1_epi32(*(const int32_t *)(xp + 4));
#if VNNI
                acc[t] = DOT4(DOT4(acc[t], lo, xa), hi, xb);
#else
                s16[t] = _mm256_add_epi16(s16[t], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa),
                                                                   _mm256_maddubs_epi16(hi, xb)));
#endif
            }
        }
#if !VNNI
        for (int t = 0; t < MT; t++) acc[t] = _mm256_madd_epi16(s16[t], _mm256_set1_epi16(1));
#endif
        return;
    }
    for (int s = 0; s < 8; s++) {               /* 4 k per step: |w| unsigned times x with w's sign */
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + s * 32)), av = _mm256_sign_epi8(v, v);
        for (int t = 0; t < MT; t++) {
            __m256i xa = _mm256_set1_epi32(*(const int32_t *)(xq + t * K + s * 4));
            acc[t] = DOT4(acc[t], av, _mm256_sign_epi8(xa, v));
        }
    }
}

/* MT (1..4) quantized rows of x against panel p. */
static inline __attribute__((always_inline)) void qtile(const int BITS, const int MT, const QuantRows *x, long row0,
                                                        int K, int gs, const uint8_t *w, const uint16_t *scales,
                                                        const uint16_t *mins, long p, int N, const float *bias,
                                                        float *y) {
    const long nb = K / QB, G = K / gs, bpg = gs / QB;
    const uint8_t *wp = w + p * (long)K * (BITS == 4 ? 4 : 8);       /* 8 rows x K codes */
    const uint16_t *sp = scales + p * G * QR, *mp = mins + p * G * QR;
    __m256 out[4];
    for (int t = 0; t < MT; t++) out[t] = _mm256_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m256 part[4];
        float xsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int t = 0; t < MT; t++) part[t] = _mm256_setzero_ps();
        for (long b = g * bpg; b < (g + 1) * bpg; b++) {
            __m256i acc[4];
            block_dots(BITS, MT, wp + b * QB * QR / (BITS == 4 ? 2 : 1), x->q + (row0 * nb + b) * QB, K, acc);
            for (int t = 0; t < MT; t++) {
                long i = (row0 + t) * nb + b;
                part[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), _mm256_broadcast_ss(x->d + i), part[t]);
                xsum[t] += x->s[i];
            }
        }
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sp + g * QR)));
        __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mp + g * QR)));
        for (int t = 0; t < MT; t++)
            out[t] = _mm256_fmadd_ps(_mm256_set1_ps(xsum[t]), m, _mm256_fmadd_ps(part[t], s, out[t]));
    }
    const long n0 = p * QR;
    const int nvalid = N - n0 < QR ? (int)(N - n0) : QR;
    for (int t = 0; t < MT; t++) {
        float tmp[QR];
        _mm256_storeu_ps(tmp, out[t]);
        for (int j = 0; j < nvalid; j++) y[(row0 + t) * N + n0 + j] = tmp[j] + (bias ? bias[n0 + j] : 0.0f);
    }
}

typedef void (*qtile_fn)(const QuantRows *, long, int, int, const uint8_t *, const uint16_t *, const uint16_t *, long,
                         int, const float *, float *);
#define DEFINE_QTILE(B, T)                                                                           \
    static void qtile_##B##_##T(const QuantRows *x, long r, int K, int gs, const uint8_t *w,         \
                                const uint16_t *sc, const uint16_t *mn, long p, int N, const float *b, \
                                float *y) { qtile(B, T, x, r, K, gs, w, sc, mn, p, N, b, y); }
DEFINE_QTILE(4, 1) DEFINE_QTILE(4, 2) DEFINE_QTILE(4, 3) DEFINE_QTILE(4, 4)
DEFINE_QTILE(8, 1) DEFINE_QTILE(8, 2) DEFINE_QTILE(8, 3) DEFINE_QTILE(8, 4)
static const qtile_fn QTILE[2][4] = {{qtile_4_1, qtile_4_2, qtile_4_3, qtile_4_4},
                                     {qtile_8_1, qtile_8_2, qtile_8_3, qtile_8_4}};

#if VNNI
static inline __m512i pair512(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

static inline __m512 pair512_ph(const uint16_t *a, const uint16_t *b) {
    __m512 lo = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)a)));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(lo),
                                               _mm256_castps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b))), 1));
}

/* 4-bit, MT (1..4) rows of x against panels p and p + 1 at once: each 512-bit vpdpbusd takes
 * both panels' 8 rows against one broadcast of x, half the broadcasts of the 256-bit path. Every
 * output element sees the same integer sums and the same float operations in the same order as
 * qtile, so the results are bit-identical. */
static inline __attribute__((always_inline)) void qtile2_4(const int MT, const QuantRows *x, long row0, int K, int gs,
                                                           const uint8_t *w, const uint16_t *scales,
                                                           const uint16_t *mins, long p, int N, const float *bias,
                                                           float *y) {
    const long nb = K / QB, G = K / gs, bpg = gs / QB, stride = (long)K * 4;
    const uint8_t *wp = w + p * stride;
    const uint16_t *sp = scales + p * G * QR, *mp = mins + p * G * QR;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512 out[4];
    for (int t = 0; t < MT; t++) out[t] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m512 part[4];
        float xsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int t = 0; t < MT; t++) part[t] = _mm512_setzero_ps();
        for (long b = g * bpg; b < (g + 1) * bpg; b++) {
            __m512i acc[4];
            for (int t = 0; t < MT; t++) acc[t] = _mm512_setzero_si512();
            for (int s = 0; s < 4; s++) {
                __m512i v = pair512(wp + b * 128 + s * 32, wp + stride + b * 128 + s * 32);
                __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                for (int t = 0; t < MT; t++) {
                    const int8_t *xp = x->q + ((row0 + t) * nb + b) * QB + s * 8;
                    acc[t] = _mm512_dpbusd_epi32(acc[t], lo, _mm512_set1_epi32(*(const int32_t *)xp));
                    acc[t] = _mm512_dpbusd_epi32(acc[t], hi, _mm512_set1_epi32(*(const int32_t *)(xp + 4)));
                }
            }
            for (int t = 0; t < MT; t++) {
                long i = (row0 + t) * nb + b;
                part[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(x->d[i]), part[t]);
                xsum[t] += x->s[i];
            }
        }
        __m512 sc = pair512_ph(sp + g * QR, sp + G * QR + g * QR), mn = pair512_ph(mp + g * QR, mp + G * QR + g * QR);
        for (int t = 0; t < MT; t++)
            out[t] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[t]), mn, _mm512_fmadd_ps(part[t], sc, out[t]));
    }
    const long n0 = p * QR;
    const int nvalid = N - n0 < 2 * QR ? (int)(N - n0) : 2 * QR;
    for (int t = 0; t < MT; t++) {
        float tmp[2 * QR];
        _mm512_storeu_ps(tmp, out[t]);
        for (int j = 0; j < nvalid; j++) y[(row0 + t) * N + n0 + j] = tmp[j] + (bias ? bias[n0 + j] : 0.0f);
    }
}

#define DEFINE_QTILE2(T)                                                                             \
    static void qtile2_4_##T(const QuantRows *x, long r, int K, int gs, const uint8_t *w,            \
                             const uint16_t *sc, const uint16_t *mn, long p, int N, const float *b,    \
                             float *y) { qtile2_4(T, x, r, K, gs, w, sc, mn, p, N, b, y); }
DEFINE_QTILE2(1) DEFINE_QTILE2(2) DEFINE_QTILE2(3) DEFINE_QTILE2(4)
static const qtile_fn QTILE2[4] = {qtile2_4_1, qtile2_4_2, qtile2_4_3, qtile2_4_4};
#endif

/* Panels p (and p + 1 when `pair`: a two-panel tile) for every row of x. */
static void panel_rows(const QuantRows *xr, int M, int K, int gs, const uint8_t *packed, int bits,
                       const uint16_t *scales, const uint16_t *mins, long p, int pair, int N,
                       const float *bias, float *y) {
    const qtile_fn *fns = QTILE[bits == 4 ? 0 : 1];
#if VNNI
    if (pair) fns = QTILE2;
#else
    (void)pair;
#endif
    for (int m0 = 0; m0 < M; m0 += 4) {
        int mt = M - m0 < 4 ? M - m0 : 4;
        fns[mt - 1](xr, m0, K, gs, packed, scales, mins, p, N, bias, y);
    }
}

/* x: [M, K] float32 (K and group_size multiples of 32); packed, scales, mins: as above;
 * y: [M, N]. */
void qs_linear_q(const float *x, int M, int K, const uint8_t *packed, int bits, const uint16_t *scales,
                 const uint16_t *mins, int group_size, const float *bias, float *y, int N, int nthreads) {
    const long nb = K / QB, npanels = (N + QR - 1) / QR;
    QuantRows xr = {malloc((size_t)M * K), malloc(sizeof(float) * M * nb), malloc(sizeof(float) * M * nb)};
    quantize_rows(x, M, K, &xr, nthreads);
    /* two panels per tile for 4-bit on VNNI, from 2 rows up (where it was measured faster,
     * benchmarks/bench_isa.py); one row (a decode GEMV) keeps the one-panel tile */
    const long step = VNNI && bits == 4 && M > 1 ? 2 : 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long p = 0; p < npanels; p += step)
        panel_rows(&xr, M, K, group_size, packed, bits, scales, mins, p, step == 2 && p + 1 < npanels, N, bias, y);
    free(xr.q);
    free(xr.d);
    free(xr.s);
}

static inline __attribute__((always_inline)) float dot(const float *a, const void *b, int ctype, long off, int D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b, ctype, off + d), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), load8(b, ctype, off + d + 8), a1);
    }
    return hsum(_mm256_add_ps(a0, a1));
}

#define MAX_GROUP 16

/* Lane j of the result = horizontal sum of a[j]. */
static inline __m256 hsum8x8(const __m256 *a) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 lo = _mm256_hadd_ps(s01, s23), hi = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* scores[t .. t+7] = q . k[t + j] * scale for 8 consecutive keys starting at element offset
 * `off` (key j at off + j * kstride). */
static inline __attribute__((always_inline)) void dot8(const float *qv, const void *k_cache, int ctype, long off, long kstride,
                                                      int D, float scale, float *scores) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        __m256 qd = _mm256_loadu_ps(qv + d);
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qd, load8(k_cache, ctype, off + j * kstride + d), acc[j]);
    }
    _mm256_storeu_ps(scores, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
}

static void softmax_inplace(float *x, long n) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    long t = 0;
    for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + t));
    float tmp[8], mx = -INFINITY;
    _mm256_storeu_ps(tmp, mv);
    for (int j = 0; j < 8; j++) mx = tmp[j] > mx ? tmp[j] : mx;
    for (long r = t; r < n; r++) mx = x[r] > mx ? x[r] : mx;
    __m256 sv = _mm256_setzero_ps(), mxv = _mm256_set1_ps(mx);
    for (t = 0; t + 8 <= n; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + t), mxv));
        _mm256_storeu_ps(x + t, e);
        sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    for (long r = t; r < n; r++) sum += (x[r] = expf(x[r] - mx));
    __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (t = 0; t + 8 <= n; t += 8) _mm256_storeu_ps(x + t, _mm256_mul_ps(_mm256_loadu_ps(x + t), inv));
    for (long r = t; r < n; r++) x[r] *= 1.0f / sum;
}

/* Ask for n rows of one head (row i: D elements at element off + i * stride) to be brought into
 * L1. Decode reads each cached row once per step and the blocks are scattered, so the hardware
 * prefetcher, which follows one stride within a page, cannot run ahead across them. */
static inline void prefetch_rows(const void *cache, int ctype, long off, long n, long stride, int D) {
    const long esize = ctype == W_F32 ? 4 : 2;
    for (long i = 0; i < n; i++)
        for (long b = 0; b < D * esize; b += 64)
            _mm_prefetch((const char *)cache + (off + i * stride) * esize + b, _MM_HINT_T0);
}

/* Scores of the G query heads of KV head h against every context token, then softmax. While a
 * block's keys are scored, the next block's keys and this block's values are fetched. */
static inline __attribute__((always_inline)) void scores_softmax(const float *const *qg, int G, const void *k_cache,
                                                                const void *v_cache, int ctype, const int64_t *table,
                                                                long L, int block_size, int Hkv, int h, int D,
                                                                float scale, float *scores, long off) {
    long kstride = (long)Hkv * D;
    for (long t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
        long n = L - t0 < block_size ? L - t0 : block_size;
        long base = (table[blk] * block_size * Hkv + h) * (long)D;
        if (t0 + block_size < L) {
            long next = L - t0 - block_size < block_size ? L - t0 - block_size : block_size;
            prefetch_rows(k_cache, ctype, (table[blk + 1] * block_size * Hkv + h) * (long)D, next, kstride, D);
        }
        prefetch_rows(v_cache, ctype, base, n, kstride, D);
        for (int g = 0; g < G; g++) {
            long i = 0;
            for (; i + 8 <= n; i += 8)
                dot8(qg[g], k_cache, ctype, base + i * kstride, kstride, D, scale, scores + g * L + t0 + i);
            for (; i < n; i++)
                scores[g * L + t0 + i] = dot(qg[g], k_cache, ctype, base + i * kstride, D) * scale;
        }
    }
    for (int g = 0; g < G; g++) {       /* the first `off` tokens lie before a sliding window: weight 0 */
        for (long i = 0; i < off; i++) scores[g * L + i] = -INFINITY;
        softmax_inplace(scores + g * L, L);
    }
}

/* acc[j] += sum over n rows i of p[i] * v[row i, 8 j .. 8 j + 7], rows in order. */
static inline __attribute__((always_inline)) void pv_rows(const int CT, const int NV, const float *p, const void *v_cache,
                                                         long base, long n, long vstride, __m256 *acc) {
    for (long i = 0; i < n; i++) {
        __m256 pv = _mm256_set1_ps(p[i]);
        for (int j = 0; j < NV; j++) acc[j] = _mm256_fmadd_ps(pv, load8(v_cache, CT, base + i * vstride + 8 * j), acc[j]);
    }
}

/* out[g] = sum_t p[g][t] v[t]; 64 lanes of D at a time held in 8 registers, t in order. */
static inline __attribute__((always_inline)) void weighted_values(const float *scores, int G, const void *v_cache, int ctype,
                                                                 const int64_t *table, long L, int block_size, int Hkv,
                                                                 int h, int D, float *const *og) {
    long vstride = (long)Hkv * D;
    for (int g = 0; g < G; g++) {
        const float *p = scores + g * L;
        for (int d0 = 0; d0 < D; d0 += 64) {
            int nv = (D - d0) / 8 < 8 ? (D - d0) / 8 : 8;
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (long t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
                long n = L - t0 < block_size ? L - t0 : block_size;
                long base = (table[blk] * block_size * Hkv + h) * (long)D + d0;
                if (nv == 8) pv_rows(ctype, 8, p + t0, v_cache, base, n, vstride, acc);   /* kept in registers */
                else pv_rows(ctype, nv, p + t0, v_cache, base, n, vstride, acc);
            }
            for (int j = 0; j < nv; j++) _mm256_storeu_ps(og[g] + d0 + 8 * j, acc[j]);
        }
    }
}

/* One KV head of one sequence: its G query heads' scores, softmax and weighted values, compiled
 * once per cache type so that no load in the inner loops tests the type. */
static inline __attribute__((always_inline)) void attend_head(const int CT, const float *const *qg, int G, const void *k_cache,
                                                             const void *v_cache, const int64_t *table, long L,
                                                             int block_size, int Hkv, int h, int D, float scale,
                                                             float *scores, float *const *og, long off) {
    scores_softmax(qg, G, k_cache, v_cache, CT, table, L, block_size, Hkv, h, D, scale, scores, off);
    weighted_values(scores, G, v_cache, CT, table, L, block_size, Hkv, h, D, og);
}

typedef void (*attend_fn)(const float *const *, int, const void *, const void *, const int64_t *, long, int, int, int,
                          int, float, float *, float *const *, long);
#define DEFINE_ATTEND(CT)                                                                                   \
    static void attend_head_##CT(const float *const *qg, int G, const void *k, const void *v,              \
                                 const int64_t *table, long L, int bs, int Hkv, int h, int D, float scale, \
                                 float *scores, float *const *og, long off) {                               \
        attend_head(CT, qg, G, k, v, table, L, bs, Hkv, h, D, scale, scores, og, off);                     \
    }
DEFINE_ATTEND(0) DEFINE_ATTEND(1) DEFINE_ATTEND(2)
static const attend_fn ATTEND[3] = {attend_head_0, attend_head_1, attend_head_2};   /* by W_F32 / W_BF16 / W_F16 */

/* One query token per sequence against its paged context.
 * q: [B, Hq, D] (row stride q_stride floats); k_cache, v_cache: [num_blocks, block_size, Hkv, D]
 * (ctype); block_tables: [B, max_blocks]; context_lens: [B]; out: [B, Hq, D].
 * D % 16 == 0, Hq / Hkv <= 16. */
void qs_decode_attention(const float *q, long q_stride, const void *k_cache, const void *v_cache, int ctype,
                         const int64_t *block_tables, const int64_t *context_lens, int B, int Hq,
                         int Hkv, int D, int block_size, int max_blocks, float scale, float *out,
                         int nthreads, int window) {
    int G = Hq / Hkv;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(nthreads)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hkv; h++) {
            /* a sliding window: from the block holding the first token it reaches, that token at `off` */
            long start = window > 0 && context_lens[b] > window ? context_lens[b] - window : 0;
            long first = start / block_size, off = start - first * block_size;
            long L = context_lens[b] - first * block_size;
            const int64_t *table = block_tables + (long)b * max_blocks + first;
            const float *qg[MAX_GROUP];
            float *og[MAX_GROUP];
            for (int g = 0; g < G; g++) {
                qg[g] = q + (long)b * q_stride + (long)(h * G + g) * D;
                og[g] = out + ((long)b * Hq + h * G + g) * D;
            }
            float *scores = malloc(sizeof(float) * G * L);
            ATTEND[ctype](qg, G, k_cache, v_cache, table, L, block_size, Hkv, h, D, scale, scores, og, off);
            free(scores);
        }
    }
}

static inline void store8(void *dst, int ctype, long idx, __m256 v) {
    if (ctype == W_BF16) {
        /* round to nearest even, as torch does when casting float32 -> bfloat16 */
        __m256i b = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
        b = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
        b = _mm256_srli_epi32(b, 16);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + idx), packed);
    } else if (ctype == W_F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + idx), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
        _mm256_storeu_ps((float *)dst + idx, v);
    }
}

/* residual (if given) += x, then out = rmsnorm(residual or x) * weight. Rows of H floats. */
void qs_add_rmsnorm(const float *x, float *residual, const float *weight, float eps, float *out,
                    int T, int H) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + (long)t * H;
        float *src = residual ? residual + (long)t * H : (float *)xr;
        __m256 ss = _mm256_setzero_ps();
        for (int h = 0; h < H; h += 8) {
            __m256 v = _mm256_loadu_ps(xr + h);
            if (residual) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(src + h));
                _mm256_storeu_ps(src + h, v);
            }
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        float inv = 1.0f / sqrtf(hsum(ss) / H + eps);
        __m256 iv = _mm256_set1_ps(inv);
        for (int h = 0; h < H; h += 8)
            _mm256_storeu_ps(out + (long)t * H + h,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(src + h), iv), _mm256_loadu_ps(weight + h)));
    }
}

/* In place, rotate_half convention: for the first `heads` heads of each row (row stride
 * `stride` floats), x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the two halves of the
 * first R of each head's D dims. cos/sin: [P, R] tables (halves duplicated). */
void qs_rope(float *x, int T, long stride, int heads, int D, int R, const int64_t *positions,
             const float *cos_t, const float *sin_t) {
    int half = R / 2;
    for (int t = 0; t < T; t++) {
        const float *c = cos_t + positions[t] * R, *s = sin_t + positions[t] * R;
        for (int h = 0; h < heads; h++) {
            float *v = x + t * stride + (long)h * D;
            for (int i = 0; i < half; i += 8) {
                __m256 x1 = _mm256_loadu_ps(v + i), x2 = _mm256_loadu_ps(v + half + i);
                __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
                _mm256_storeu_ps(v + i, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
                _mm256_storeu_ps(v + half + i, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
            }
        }
    }
}

/* Copy T rows of `width` floats (row stride `stride`) into cache slots (ctype). */
void qs_kv_write(const float *src, long stride, int T, int width, const int64_t *slots, void *cache,
                 int ctype) {
    for (int t = 0; t < T; t++)
        for (int i = 0; i < width; i += 8)
            store8(cache, ctype, slots[t] * width + i, _mm256_loadu_ps(src + t * stride + i));
}

/* gate_up: [T, 2I] rows [gate | up] -> out: [T, I] = silu(gate) * up. I % 8 == 0. */
void qs_silu_mul(const float *gate_up, float *out, int T, int I) {
    for (int t = 0; t < T; t++) {
        const float *g = gate_up + (long)t * 2 * I, *u = g + I;
        for (int i = 0; i < I; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(out + (long)t * I + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
    }
}

/* ---- a whole decode step through every layer in one call ------------------------------- */

typedef struct {
    const void *w;                     /* float panels (wtype), or integer code panels when bits > 0 */
    const uint16_t *scales, *mins;     /* integer weights only (float16) */
    int bits, group_size;
} LinearWeights;

typedef struct {
    LinearWeights qkv, o, gate_up, down;
    const float *qkv_bias, *o_bias;              /* or NULL */
    const float *attn_norm, *mlp_norm;           /* [H] */
    const float *q_norm, *k_norm;                /* [D] RMSNorm of each q and k head (Qwen3), or NULL */
    int rope;                                    /* 0: this layer's q and k are not rotated (SmolLM3) */
} LayerWeights;

static void run_linear(const LinearWeights *lw, int wtype, const float *x, int M, int K, const float *bias,
                       float *y, int N, int nthreads) {
    if (lw->bits)
        qs_linear_q(x, M, K, lw->w, lw->bits, lw->scales, lw->mins, lw->group_size, bias, y, N, nthreads);
    else
        qs_linear(x, M, K, lw->w, wtype, bias, y, N, nthreads);
}

typedef struct {
    int T, H, Hq, Hkv, D, R, I, wtype, ctype, block_size, max_blocks, nthreads;   /* R: rotary dims */
    float eps, scale;
    const int64_t *positions, *slots, *block_tables, *context_lens;   /* [T], [T], [T, max_blocks], [T] */
    const float *cos, *sin;                                            /* [P, R] */
    void *k_cache, *v_cache;                     /* [L, num_blocks, block_size, Hkv, D] (ctype) */
    long layer_stride;                           /* elements between layers of the cache */
    int kv_bits;                                 /* 0: float cache; 4 / 8: quantized (k_cache = codes) */
    uint16_t *k_scale, *v_scale;                 /* [L, num_blocks, block_size, Hkv] when quantized */
    uint8_t *k_zero, *v_zero;
    long k_param_stride, v_param_stride;         /* elements between layers of scale / zero */
    int k_groups, v_groups;
    int window;                                  /* sliding window (tokens back, this one included); 0: none */
    const uint16_t *k_fixed_scale, *v_fixed_scale;   /* static KV parameters [L, Hkv, groups]; NULL: online */
    const uint8_t *k_fixed_zero, *v_fixed_zero;
} DecodeBatch;

/* ---- quantized KV cache (see quantserve/kvcache/quant.py for the scheme) ----------------- */

#define MAX_HEAD_DIM 256

typedef struct {
    void *data;          /* [num_blocks, block_size, Hkv, D] uint8 (int8) or [.., D/2] (int4) */
    uint16_t *scale;     /* [num_blocks, block_size, Hkv] float16 */
    uint8_t *zero;       /* [num_blocks, block_size, Hkv] */
    int bits;
    int groups;          /* 1, or 2 = one scale / zero per half of the head ([..., Hkv, 2]) */
    const uint16_t *fixed_scale;   /* static parameters, [Hkv, groups] (lite kv_qparams); NULL: online */
    const uint8_t *fixed_zero;
    int hkv;
} QuantCache;

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* int4 rotates head vectors by the normalized Hadamard matrix when D is a power of two. */
static inline int rotates(int bits, int D) { return bits == 4 && (D & (D - 1)) == 0; }

/* In place v <- H v / sqrt(D) (fast Walsh-Hadamard transform, Sylvester order). */
static void fwht(float *v, int D) {
    for (int len = 1; len < D; len <<= 1)
        for (int i = 0; i < D; i += 2 * len)
            for (int j = i; j < i + len; j++) {
                float a = v[j], b = v[j + len];
                v[j] = a + b;
                v[j + len] = a - b;
            }
    float norm = 1.0f / sqrtf((float)D);
    for (int i = 0; i < D; i++) v[i] *= norm;
}

/* Codes of x[n] for one group with the static scale and zero of its head and group, clamped to
 * the code range (values past the calibrated range saturate); both are written at `param` too,
 * so the readers never know which. */
static void quantize_group_fixed(const float *x, int n, const QuantCache *c, long param, uint8_t *q) {
    long fixed = (param / c->groups % c->hkv) * c->groups + param % c->groups;
    uint16_t s16 = c->fixed_scale[fixed];
    uint8_t z = c->fixed_zero[fixed];
    c->scale[param] = s16;
    c->zero[param] = z;
    float sf = half_to_float(s16), top = (float)((1 << c->bits) - 1);
    for (int d = 0; d < n; d++) {
        float v = nearbyintf(x[d] / sf) + (float)z;
        q[d] = (uint8_t)(v < 0.0f ? 0.0f : v > top ? top : v);
    }
}

/* Codes of x[n] for one group: scale (float16, rounded up) and integer zero written at `param`. */
static void quantize_group(const float *x, int n, const QuantCache *c, long param, uint8_t *q) {
    if (c->fixed_scale) {
        quantize_group_fixed(x, n, c, param, q);
        return;
    }
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int d = 0; d < n; d += 8) {
        __m256 v = _mm256_loadu_ps(x + d);
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
    }
    float tl[8], th[8], mn = 0.0f, mx = 0.0f;
    _mm256_storeu_ps(tl, lo);
    _mm256_storeu_ps(th, hi);
    for (int j = 0; j < 8; j++) {
        mn = tl[j] < mn ? tl[j] : mn;
        mx = th[j] > mx ? th[j] : mx;
    }
    float s = (mx - mn) / (float)((1 << c->bits) - 2);
    if (s < 1e-6f) s = 1e-6f;
    uint16_t s16 = _cvtss_sh(s, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    float sf = half_to_float(s16), z = ceilf(-mn / sf);
    c->scale[param] = s16;
    c->zero[param] = (uint8_t)z;
    __m256 sv = _mm256_set1_ps(sf), zv = _mm256_set1_ps(z);
    for (int d = 0; d < n; d += 8) {
        __m256 v = _mm256_add_ps(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + d), sv),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zv);
        int32_t t[8];
        _mm256_storeu_si256((__m256i *)t, _mm256_cvtps_epi32(v));
        for (int j = 0; j < 8; j++) q[d + j] = (uint8_t)t[j];
    }
}

/* Quantize one head vector x[D] into slot `row` (= slot * Hkv + head) of the cache. */
static void quantize_head(const float *x_in, int D, const QuantCache *c, long row) {
    float rotated[MAX_HEAD_DIM];
    const float *x = x_in;
    if (rotates(c->bits, D)) {
        memcpy(rotated, x_in, sizeof(float) * D);
        fwht(rotated, D);
        x = rotated;
    }
    uint8_t q[MAX_HEAD_DIM];
    int n = D / c->groups;
    for (int g = 0; g < c->groups; g++) quantize_group(x + g * n, n, c, row * c->groups + g, q + g * n);
    uint8_t *dst = (uint8_t *)c->data + row * (long)(c->bits == 4 ? D / 2 : D);
    if (c->bits == 8) {
        memcpy(dst, q, D);
    } else {
        for (int i = 0; i < D / 2; i++) dst[i] = q[i] | (uint8_t)(q[i + D / 2] << 4);
    }
}

/* Rows of Hkv * D floats (row stride `stride`) into quantized cache slots. */
void qs_kv_write_quant(const float *src, long stride, int T, int Hkv, int D, const int64_t *slots,
                       void *data, uint16_t *scale, uint8_t *zero, int bits, int groups,
                       const uint16_t *fixed_scale, const uint8_t *fixed_zero) {
    QuantCache c = {data, scale, zero, bits, groups, fixed_scale, fixed_zero, Hkv};
    for (int t = 0; t < T; t++)
        for (int h = 0; h < Hkv; h++) quantize_head(src + t * stride + (long)h * D, D, &c, slots[t] * Hkv + h);
}

/* 8 codes of one head starting at dimension d (int8), as floats. */
static inline __m256 codes8_u8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* int4: the 8 bytes at p hold dims d..d+7 (low nibbles) and d+D/2..d+D/2+7 (high nibbles). */
static inline void codes8_u4(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

/* sum_d q[d] * code[d] for the head stored at `row`, as the sums over the low and high halves
 * of the head (int8: all of it in *lo). */
static inline void dot_codes(const float *q, const QuantCache *c, long row, int D, float *lo_sum, float *hi_sum) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    if (c->bits == 8) {
        const uint8_t *p = (const uint8_t *)c->data + row * D;
        for (int d = 0; d < D; d += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), codes8_u8(p + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), codes8_u8(p + d + 8), a1);
        }
    } else {
        const uint8_t *p = (const uint8_t *)c->data + row * (D / 2);
        for (int d = 0; d < D / 2; d += 8) {
            __m256 lo, hi;
            codes8_u4(p + d, &lo, &hi);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), lo, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + D / 2 + d), hi, a1);
        }
        *lo_sum = hsum(a0);
        *hi_sum = hsum(a1);
        return;
    }
    *lo_sum = hsum(_mm256_add_ps(a0, a1));
    *hi_sum = 0.0f;
}

/* scale * (q . code - zero * sum(q)), per group. qsum: sums of q over the two halves. */
static inline float key_score(const float *q, const float *qsum, const QuantCache *c, long row, int D) {
    float lo, hi;
    dot_codes(q, c, row, D, &lo, &hi);
    if (c->groups == 2) {
        long p = row * 2;
        return half_to_float(c->scale[p]) * (lo - c->zero[p] * qsum[0]) +
               half_to_float(c->scale[p + 1]) * (hi - c->zero[p + 1] * qsum[1]);
    }
    return half_to_float(c->scale[row]) * (lo + hi - c->zero[row] * (qsum[0] + qsum[1]));
}

/* acc[0..D/8) += w * codes of the head at `row` (int8 or int4), in dimension order. */
static inline void axpy_codes(__m256 *acc, float w, const QuantCache *c, long row, int D) {
    __m256 wv = _mm256_set1_ps(w);
    if (c->bits == 8) {
        const uint8_t *p = (const uint8_t *)c->data + row * D;
        for (int d = 0; d < D; d += 8) acc[d / 8] = _mm256_fmadd_ps(wv, codes8_u8(p + d), acc[d / 8]);
    } else {
        const uint8_t *p = (const uint8_t *)c->data + row * (D / 2);
        for (int d = 0; d < D / 2; d += 8) {
            __m256 lo, hi;
            codes8_u4(p + d, &lo, &hi);
            acc[d / 8] = _mm256_fmadd_ps(wv, lo, acc[d / 8]);
            acc[(D / 2 + d) / 8] = _mm256_fmadd_ps(wv, hi, acc[(D / 2 + d) / 8]);
        }
    }
}

/* Decode attention over a quantized cache. score_t = scale_t (q . code_t - zero_t sum(q));
 * out = sum_t p_t scale_t code_t - (sum_t p_t scale_t zero_t). Same shapes as
 * qs_decode_attention; D % 16 == 0, D <= 256. */
void qs_decode_attention_quant(const float *q, long q_stride, const QuantCache *kc, const QuantCache *vc,
                               const int64_t *block_tables, const int64_t *context_lens, int B, int Hq,
                               int Hkv, int D, int block_size, int max_blocks, float scale, float *out,
                               int nthreads, int window) {
    int G = Hq / Hkv;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(nthreads)
    for (int b = 0; b < B; b++) {
        for (int hq = 0; hq < Hq; hq++) {
            int h = hq / G;
            long L = context_lens[b];
            const int64_t *table = block_tables + (long)b * max_blocks;
            float qv[MAX_HEAD_DIM];
            memcpy(qv, q + (long)b * q_stride + (long)hq * D, sizeof(float) * D);
            int rot = rotates(kc->bits, D);
            if (rot) fwht(qv, D);
            float qsum[2] = {0.0f, 0.0f};
            for (int d = 0; d < D; d++) qsum[d >= D / 2] += qv[d];
            long start = window > 0 && L > window ? L - window : 0;     /* a sliding window's first token */
            float *p = malloc(sizeof(float) * L);
            for (long t = 0; t < start; t++) p[t] = 0.0f;
            for (long t = start; t < L; t++) {
                long row = (table[t / block_size] * block_size + t % block_size) * Hkv + h;
                p[t] = key_score(qv, qsum, kc, row, D) * scale;
            }
            softmax_inplace(p + start, L - start);
            __m256 acc[MAX_HEAD_DIM / 8];
            for (int j = 0; j < D / 8; j++) acc[j] = _mm256_setzero_ps();
            float shift = 0.0f;
            for (long t = start; t < L; t++) {
                long row = (table[t / block_size] * block_size + t % block_size) * Hkv + h;
                float w = p[t] * half_to_float(vc->scale[row]);
                axpy_codes(acc, w, vc, row, D);
                shift += w * vc->zero[row];
            }
            float *o = out + ((long)b * Hq + hq) * D;
            for (int j = 0; j < D / 8; j++) _mm256_storeu_ps(o + 8 * j, _mm256_sub_ps(acc[j], _mm256_set1_ps(shift)));
            if (rot) fwht(o, D);
            free(p);
        }
    }
}

static inline void *cache_layer(void *base, int ctype, long offset) {
    return (char *)base + offset * (ctype == W_F32 ? 4 : 2);
}

/* Write this step's K/V of layer l into the cache and attend over it. */
static void attend(const DecodeBatch *b, int l, const float *qkv, int nqkv, int qd, int kvd, float *attn) {
    int T = b->T;
    if (b->kv_bits) {
        long lo = l * b->layer_stride * b->kv_bits / 8, kp = l * b->k_param_stride, vp = l * b->v_param_stride;
        long kf = (long)l * b->Hkv * b->k_groups, vf = (long)l * b->Hkv * b->v_groups;   /* static: [L, Hkv, G] */
        const uint16_t *kfs = b->k_fixed_scale ? b->k_fixed_scale + kf : NULL;
        const uint16_t *vfs = b->v_fixed_scale ? b->v_fixed_scale + vf : NULL;
        const uint8_t *kfz = b->k_fixed_zero ? b->k_fixed_zero + kf : NULL;
        const uint8_t *vfz = b->v_fixed_zero ? b->v_fixed_zero + vf : NULL;
        QuantCache kc = {(uint8_t *)b->k_cache + lo, b->k_scale + kp, b->k_zero + kp, b->kv_bits, b->k_groups,
                         kfs, kfz, b->Hkv};
        QuantCache vc = {(uint8_t *)b->v_cache + lo, b->v_scale + vp, b->v_zero + vp, b->kv_bits, b->v_groups,
                         vfs, vfz, b->Hkv};
        qs_kv_write_quant(qkv + qd, nqkv, T, b->Hkv, b->D, b->slots, kc.data, kc.scale, kc.zero, b->kv_bits,
                          b->k_groups, kfs, kfz);
        qs_kv_write_quant(qkv + qd + kvd, nqkv, T, b->Hkv, b->D, b->slots, vc.data, vc.scale, vc.zero, b->kv_bits,
                          b->v_groups, vfs, vfz);
        qs_decode_attention_quant(qkv, nqkv, &kc, &vc, b->block_tables, b->context_lens, T, b->Hq, b->Hkv, b->D,
                                  b->block_size, b->max_blocks, b->scale, attn, b->nthreads, b->window);
        return;
    }
    void *kc = cache_layer(b->k_cache, b->ctype, l * b->layer_stride);
    void *vc = cache_layer(b->v_cache, b->ctype, l * b->layer_stride);
    qs_kv_write(qkv + qd, nqkv, T, kvd, b->slots, kc, b->ctype);
    qs_kv_write(qkv + qd + kvd, nqkv, T, kvd, b->slots, vc, b->ctype);
    qs_decode_attention(qkv, nqkv, kc, vc, b->ctype, b->block_tables, b->context_lens, T, b->Hq, b->Hkv, b->D,
                        b->block_size, b->max_blocks, b->scale, attn, b->nthreads, b->window);
}

/* qkv rows [Hq q heads | Hkv k heads | v]: every q and k head RMS-normalised in place. */
static void norm_heads(float *qkv, int T, int nqkv, int Hq, int Hkv, int D, const float *q_norm,
                       const float *k_norm, float eps) {
    for (int t = 0; t < T; t++) {
        float *q = qkv + (long)t * nqkv, *k = q + (long)Hq * D;
        qs_add_rmsnorm(q, NULL, q_norm, eps, q, Hq, D);
        qs_add_rmsnorm(k, NULL, k_norm, eps, k, Hkv, D);
    }
}

/* Built with -DQS_PROFILE (benchmarks/profile_decode.py), qs_decode_layers adds up the wall time
 * of its stages: 0 qkv, 1 rope + KV write + attention, 2 o, 3 gate_up, 4 down, 5 norms + silu. */
#ifdef QS_PROFILE
#include <time.h>
static double stage_s[6];
static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
/* out: [6] seconds per stage since the last read */
void qs_profile_read(double *out) {
    for (int i = 0; i < 6; i++) { out[i] = stage_s[i]; stage_s[i] = 0.0; }
}
#define STAGE(i, stmt) do { double t0_ = now_s(); stmt; stage_s[i] += now_s() - t0_; } while (0)
#else
#define STAGE(i, stmt) stmt
#endif

/* x: [T, H] embeddings in; on return x holds the last layer's output and residual the stream
 * before it (the caller applies the final add + norm). Same kernels, same order as the
 * module-by-module path, so the numbers are identical. */
void qs_decode_layers(const LayerWeights *layers, int L, const DecodeBatch *b, float *x, float *residual) {
    int T = b->T, H = b->H, qd = b->Hq * b->D, kvd = b->Hkv * b->D, nqkv = qd + 2 * kvd;
    float *h = malloc(sizeof(float) * T * H), *qkv = malloc(sizeof(float) * T * nqkv);
    float *attn = malloc(sizeof(float) * T * qd), *gu = malloc(sizeof(float) * T * 2 * b->I);
    float *act = malloc(sizeof(float) * T * b->I);
    for (int l = 0; l < L; l++) {
        const LayerWeights *w = layers + l;
        if (l == 0) memcpy(residual, x, sizeof(float) * T * H);
        STAGE(5, qs_add_rmsnorm(x, l == 0 ? NULL : residual, w->attn_norm, b->eps, h, T, H));
        STAGE(0, run_linear(&w->qkv, b->wtype, h, T, H, w->qkv_bias, qkv, nqkv, b->nthreads));
        if (w->q_norm) STAGE(5, norm_heads(qkv, T, nqkv, b->Hq, b->Hkv, b->D, w->q_norm, w->k_norm, b->eps));
        STAGE(1, if (w->rope) qs_rope(qkv, T, nqkv, b->Hq + b->Hkv, b->D, b->R, b->positions, b->cos, b->sin);
                 attend(b, l, qkv, nqkv, qd, kvd, attn));
        STAGE(2, run_linear(&w->o, b->wtype, attn, T, qd, w->o_bias, x, H, b->nthreads));
        STAGE(5, qs_add_rmsnorm(x, residual, w->mlp_norm, b->eps, h, T, H));
        STAGE(3, run_linear(&w->gate_up, b->wtype, h, T, H, NULL, gu, 2 * b->I, b->nthreads));
        STAGE(5, qs_silu_mul(gu, act, T, b->I));
        STAGE(4, run_linear(&w->down, b->wtype, act, T, b->I, NULL, x, H, b->nthreads));
    }
    free(h); free(qkv); free(attn); free(gu); free(act);
}


/* ---- causal prefill attention, flash-style, reading the paged cache in place ---------------
 * A work item is one KV head and a tile of FA_BM query rows: its lanes (query row i, head g of
 * the KV head's group at lane i * G + g) meet the context in tiles of FA_BN keys, read in place
 * from a float32 cache, else converted (dequantized) once per tile for all the lanes. Tiles past
 * the diagonal are never visited. Scores are key-major, S[key][lane], so the online
 * softmax (running max m and sum l per lane, output rescaled by alpha = exp(m_old - m_new)) is
 * lane-wise with no horizontal sums, and every output element is summed in the same order
 * whatever the vector width: the avx512 and avx2 builds agree to the bit, and a row's numbers
 * do not depend on its tile or on how many rows the call has. Masked keys give exactly 0. */
#define FA_BM 64                 /* query rows per tile */
#define FA_BN 64                 /* keys per tile: how often the running max may rescale */

#ifdef __AVX512F__
typedef __m512 fv;
#define FV 16
#define FA_KS 8                  /* keys per scores pass: 2 x 8 accumulators of the 32 zmm */
#define FA_MR 4                  /* rows per P.V pass: 4 x 4 accumulators */
#define fv_load _mm512_loadu_ps
#define fv_store _mm512_storeu_ps
#define fv_set1 _mm512_set1_ps
#define fv_fma _mm512_fmadd_ps
#define fv_mul _mm512_mul_ps
#define fv_sub _mm512_sub_ps
#define fv_add _mm512_add_ps
#define fv_max _mm512_max_ps

/* exp8 on 16 lanes, operation for operation (the same numbers). */
static inline __m512 fv_exp(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)), _mm512_set1_ps(88.3762626647949f));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

/* x, with -inf in the lanes where key > pos (a key past the query's position). */
static inline fv fv_causal(fv x, fv key, fv pos) {
    return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(key, pos, _CMP_GT_OQ), _mm512_set1_ps(-INFINITY));
}
#else
typedef __m256 fv;
#define FV 8
#define FA_KS 4                  /* keys per scores pass: 2 x 4 accumulators of the 16 ymm */
#define FA_MR 2                  /* rows per P.V pass: 2 x 4 accumulators */
#define fv_load _mm256_loadu_ps
#define fv_store _mm256_storeu_ps
#define fv_set1 _mm256_set1_ps
#define fv_fma _mm256_fmadd_ps
#define fv_mul _mm256_mul_ps
#define fv_sub _mm256_sub_ps
#define fv_add _mm256_add_ps
#define fv_max _mm256_max_ps
#define fv_exp exp8

static inline fv fv_causal(fv x, fv key, fv pos) {
    return _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(key, pos, _CMP_GT_OQ));
}
#endif
#define FA_LB (2 * FV)           /* lanes per score block: two vectors */

typedef struct {
    const void *k, *v;                   /* float caches [num_blocks, block_size, Hkv, D] (ctype) */
    int ctype;
    const QuantCache *kq, *vq;           /* or quantized ones (k, v NULL) */
    const int64_t *block_ids;
    int L, N, Hq, Hkv, D, block_size, nthreads;
    long q_stride;
    float scale;
    int window;                          /* sliding window: a row sees this many keys back (itself included); 0: all */
} FaArgs;

typedef struct {
    float *qt;           /* [R / LB][D][LB] scaled (and for int4, rotated) queries */
    float *o;            /* [R][D] unnormalized outputs */
    float *k, *v;        /* [FA_BN][D] one tile of the context converted to float32 */
    float *zero;         /* [D] zeros: the rows past the context */
    const float *kr[FA_BN], *vr[FA_BN];    /* the tile's key and value rows as float32 */
    float *s;            /* [FA_BN][LB] scores, then probabilities, of one lane block */
    float *pos, *m, *l;  /* [R] position, running max and running sum of each lane */
    float alpha[FA_LB];
} FaBuf;

/* One head of a quantized cache row as floats, (code - zero) * scale per group (int4 stays
 * rotated: the queries and the output are rotated instead). */
static void fa_dequant(const QuantCache *c, long row, int D, float *dst) {
    long p = row * c->groups, p1 = p + (c->groups == 2);
    __m256 s0 = _mm256_set1_ps(half_to_float(c->scale[p])), z0 = _mm256_set1_ps(c->zero[p]);
    __m256 s1 = _mm256_set1_ps(half_to_float(c->scale[p1])), z1 = _mm256_set1_ps(c->zero[p1]);
    if (c->bits == 8) {
        const uint8_t *q = (const uint8_t *)c->data + row * D;
        for (int d = 0; d < D; d += 8) {
            int hi = d >= D / 2;
            _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_sub_ps(codes8_u8(q + d), hi ? z1 : z0), hi ? s1 : s0));
        }
        return;
    }
    const uint8_t *q = (const uint8_t *)c->data + row * (D / 2);
    for (int d = 0; d < D / 2; d += 8) {
        __m256 lo, hi;
        codes8_u4(q + d, &lo, &hi);
        _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_sub_ps(lo, z0), s0));
        _mm256_storeu_ps(dst + D / 2 + d, _mm256_mul_ps(_mm256_sub_ps(hi, z1), s1));
    }
}

/* Rows of keys (or values) k0 .. k0 + nk - 1 of KV head h as float32: in place in a float32
 * cache, else converted (dequantized) into buf [nk][D]; past the context, a row of zeros. */
static void fa_rows(const FaArgs *a, const void *cache, const QuantCache *qc, int h, int k0, int nk, float *buf,
                    const float *zero, const float **rows) {
    int D = a->D;
    for (int j = 0; j < nk; j++) {
        long t = k0 + j;
        if (t >= a->L) {
            rows[j] = zero;
            continue;
        }
        long row = (a->block_ids[t / a->block_size] * a->block_size + t % a->block_size) * a->Hkv + h;
        float *x = buf + (long)j * D;
        rows[j] = x;
        if (qc) fa_dequant(qc, row, D, x);
        else if (a->ctype == W_F32) rows[j] = (const float *)cache + row * D;
        else
            for (int d = 0; d < D; d += 8) _mm256_storeu_ps(x + d, load8(cache, a->ctype, row * D + d));
    }
}

/* Queries of rows q0 .. q0 + rows - 1 for KV head h into b->qt, times scale (int4: rotated
 * first); lanes past rows * G are zero and take the last row's position, so no lane is ever
 * fully masked. Resets m, l and o. Returns the lanes in use (a multiple of LB). */
static int fa_pack_q(const FaArgs *a, const float *q, int h, int q0, int rows, int rot, FaBuf *b) {
    int G = a->Hq / a->Hkv, D = a->D, used = rows * G, R = (used + FA_LB - 1) / FA_LB * FA_LB;
    for (int r = 0; r < R; r++) {
        int i = r < used ? r / G : rows - 1;
        float x[MAX_HEAD_DIM];
        const float *src = q + (long)(q0 + i) * a->q_stride + (long)(h * G + r % G) * D;
        if (rot && r < used) {
            memcpy(x, src, sizeof(float) * D);
            fwht(x, D);
            src = x;
        }
        float *dst = b->qt + (long)(r / FA_LB) * D * FA_LB + r % FA_LB, sc = r < used ? a->scale : 0.0f;
        for (int d = 0; d < D; d++) dst[(long)d * FA_LB] = src[d] * sc;
        b->pos[r] = (float)(a->L - a->N + q0 + i);
        b->m[r] = -INFINITY;
        b->l[r] = 0.0f;
    }
    memset(b->o, 0, sizeof(float) * R * D);
    return R;
}

/* s[j][0 .. LB) = sum_d k[j][d] qt[d][0 .. LB) for j < nk (nk % 8 == 0): FA_KS keys x 2 vectors
 * of lanes per pass, one key broadcast per 2 FMAs. */
static void fa_scores(const float *qt, const float *const *k, int nk, int D, float *s) {
    for (int j0 = 0; j0 < nk; j0 += FA_KS) {
        fv a0[FA_KS], a1[FA_KS];
        for (int j = 0; j < FA_KS; j++) a0[j] = a1[j] = fv_set1(0.0f);
        for (int d = 0; d < D; d++) {
            fv q0 = fv_load(qt + (long)d * FA_LB), q1 = fv_load(qt + (long)d * FA_LB + FV);
            for (int j = 0; j < FA_KS; j++) {
                fv kb = fv_set1(k[j0 + j][d]);
                a0[j] = fv_fma(kb, q0, a0[j]);
                a1[j] = fv_fma(kb, q1, a1[j]);
            }
        }
        for (int j = 0; j < FA_KS; j++) {
            fv_store(s + (long)(j0 + j) * FA_LB, a0[j]);
            fv_store(s + (long)(j0 + j) * FA_LB + FV, a1[j]);
        }
    }
}

/* Online softmax of one lane block over keys k0 .. k0 + nk - 1: scores past a lane's position
 * masked when `diag`, s turned into p = exp(s - m_new) in place, l = alpha l + sum p,
 * alpha = exp(m_old - m_new) left for the output. */
static void fa_softmax(float *s, int nk, int k0, int diag, int window, const float *pos, float *m, float *l,
                       float *alpha) {
    for (int c = 0; c < FA_LB; c += FV) {
        fv mx = fv_load(m + c), p = fv_load(pos + c);
        for (int j = 0; j < nk; j++) {
            fv x = fv_load(s + (long)j * FA_LB + c);
            if (diag)
                x = fv_causal(x, fv_set1((float)(k0 + j)), p);
            if (window)         /* keys before the window: position > key + window - 1 */
                x = fv_causal(x, p, fv_set1((float)(k0 + j + window - 1)));
            if (diag || window)
                fv_store(s + (long)j * FA_LB + c, x);
            mx = fv_max(mx, x);
        }
        fv al = fv_exp(fv_sub(fv_load(m + c), mx)), sum = fv_mul(fv_load(l + c), al);
        for (int j = 0; j < nk; j++) {
            fv e = fv_exp(fv_sub(fv_load(s + (long)j * FA_LB + c), mx));
            fv_store(s + (long)j * FA_LB + c, e);
            sum = fv_add(sum, e);
        }
        fv_store(m + c, mx);
        fv_store(l + c, sum);
        fv_store(alpha + c, al);
    }
}

/* o[r][d0 ..] = alpha[r] o[r] + sum_j p[j][r] v[j][d0 ..] for the LB rows of a lane block, NV
 * vectors of D and FA_MR rows per pass, keys in order. */
static inline __attribute__((always_inline)) void fa_pv_cols(const int NV, float *o, int D, int d0, const float *alpha,
                                                             const float *p, const float *const *v, int nk) {
    for (int r0 = 0; r0 < FA_LB; r0 += FA_MR) {
        fv acc[FA_MR][4];
        for (int r = 0; r < FA_MR; r++)
            for (int c = 0; c < NV; c++)
                acc[r][c] = fv_mul(fv_load(o + (long)(r0 + r) * D + d0 + c * FV), fv_set1(alpha[r0 + r]));
        for (int j = 0; j < nk; j++) {
            fv vv[4];
            for (int c = 0; c < NV; c++) vv[c] = fv_load(v[j] + d0 + c * FV);
            for (int r = 0; r < FA_MR; r++) {
                fv pb = fv_set1(p[(long)j * FA_LB + r0 + r]);
                for (int c = 0; c < NV; c++) acc[r][c] = fv_fma(pb, vv[c], acc[r][c]);
            }
        }
        for (int r = 0; r < FA_MR; r++)
            for (int c = 0; c < NV; c++) fv_store(o + (long)(r0 + r) * D + d0 + c * FV, acc[r][c]);
    }
}

typedef void (*fa_pv_fn)(float *, int, int, const float *, const float *, const float *const *, int);
#define DEFINE_FA_PV(NV)                                                                             \
    static void fa_pv##NV(float *o, int D, int d0, const float *al, const float *p, const float *const *v, \
                          int nk) { fa_pv_cols(NV, o, D, d0, al, p, v, nk); }
DEFINE_FA_PV(1) DEFINE_FA_PV(2) DEFINE_FA_PV(3) DEFINE_FA_PV(4)
static const fa_pv_fn FA_PV[5] = {NULL, fa_pv1, fa_pv2, fa_pv3, fa_pv4};

/* The whole head width in passes of up to 4 vectors. */
static void fa_pv(float *o, int D, const float *alpha, const float *p, const float *const *v, int nk) {
    for (int d0 = 0; d0 < D; d0 += 4 * FV) FA_PV[(D - d0) / FV < 4 ? (D - d0) / FV : 4](o, D, d0, alpha, p, v, nk);
}

/* The tile's rows of out = o / l (int4: rotated back). */
static void fa_store(const FaArgs *a, int h, int q0, int rows, const FaBuf *b, float *out) {
    int G = a->Hq / a->Hkv, D = a->D, rot = a->vq && rotates(a->vq->bits, D);
    for (int r = 0; r < rows * G; r++) {
        float *dst = out + ((long)(q0 + r / G) * a->Hq + h * G + r % G) * D;
        fv inv = fv_set1(1.0f / b->l[r]);
        for (int d = 0; d < D; d += FV) fv_store(dst + d, fv_mul(fv_load(b->o + (long)r * D + d), inv));
        if (rot) fwht(dst, D);
    }
}

/* One work item: KV head h, query rows from q0, against the key tiles its rows can see. A lane
 * block skips the keys past its last lane's position (they would only add exact zeros). */
static void fa_tile(const FaArgs *a, const float *q, int h, int q0, FaBuf *b, float *out) {
    int rows = a->N - q0 < FA_BM ? a->N - q0 : FA_BM, D = a->D;
    int R = fa_pack_q(a, q, h, q0, rows, a->kq && rotates(a->kq->bits, D), b);
    int last = a->L - a->N + q0 + rows - 1;                       /* position of the tile's last row */
    int lowest = a->window ? a->L - a->N + q0 - a->window + 1 : 0;  /* first key the tile's first row sees */
    for (int k0 = lowest > 0 ? lowest / FA_BN * FA_BN : 0; k0 <= last; k0 += FA_BN) {
        int nk = last + 1 - k0 < FA_BN ? (last + 1 - k0 + 7) / 8 * 8 : FA_BN;
        fa_rows(a, a->k, a->kq, h, k0, nk, b->k, b->zero, b->kr);
        fa_rows(a, a->v, a->vq, h, k0, nk, b->v, b->zero, b->vr);
        for (int r0 = 0; r0 < R; r0 += FA_LB) {
            int see = (int)b->pos[r0 + FA_LB - 1] + 1 - k0;          /* keys seen by the block's last lane */
            if (see <= 0) continue;
            int n = see < nk ? (see + 7) / 8 * 8 : nk;
            fa_scores(b->qt + (long)r0 * D, b->kr, n, D, b->s);
            fa_softmax(b->s, n, k0, k0 + n - 1 > (int)b->pos[r0], a->window, b->pos + r0, b->m + r0, b->l + r0,
                       b->alpha);
            fa_pv(b->o + (long)r0 * D, D, b->alpha, b->s, b->vr, n);
        }
    }
    fa_store(a, h, q0, rows, b, out);
}

/* Every (KV head, query tile) item over the threads, each with its own buffers. */
static void fa_run(const FaArgs *a, const float *q, float *out) {
    const int tiles = (a->N + FA_BM - 1) / FA_BM;
    const long R = ((long)FA_BM * (a->Hq / a->Hkv) + FA_LB - 1) / FA_LB * FA_LB, D = a->D;   /* lanes of a full tile */
    const size_t floats = 2 * R * D + 2 * FA_BN * D + D + FA_BN * FA_LB + 3 * R;
#pragma omp parallel num_threads(a->nthreads)
    {
        float *mem = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        FaBuf b = {.qt = mem, .o = mem + R * D, .k = mem + 2 * R * D, .v = mem + 2 * R * D + FA_BN * D};
        b.zero = memset(b.v + FA_BN * D, 0, sizeof(float) * D);
        b.s = b.zero + D;
        b.pos = b.s + FA_BN * FA_LB;
        b.m = b.pos + R;
        b.l = b.m + R;
        /* later query tiles see more keys: hand them out first */
#pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < tiles * a->Hkv; w++) fa_tile(a, q, w % a->Hkv, (tiles - 1 - w / a->Hkv) * FA_BM, &b, out);
        free(mem);
    }
}

/* Causal attention of the last N positions of a context of context_len tokens whose K/V (these
 * N included) are in one layer of the paged cache. q: [N, Hq, D] (row stride q_stride floats);
 * k_cache, v_cache: [num_blocks, block_size, Hkv, D] (ctype); token t in block block_ids[t /
 * block_size] at offset t % block_size; query row i sits at position context_len - N + i and sees
 * keys 0 .. context_len - N + i (with a sliding window > 0, only the last `window` of those);
 * KV head of query head h: h / (Hq / Hkv). out: [N, Hq, D].
 * D % 16 == 0, D <= 256. */
void qs_prefill_attention(const float *q, long q_stride, const void *k_cache, const void *v_cache, int ctype,
                          const int64_t *block_ids, int context_len, int N, int Hq, int Hkv, int D, int block_size,
                          float scale, float *out, int nthreads, int window) {
    FaArgs a = {k_cache, v_cache, ctype, NULL, NULL, block_ids, context_len, N, Hq, Hkv, D, block_size, nthreads,
                q_stride, scale, window};
    fa_run(&a, q, out);
}

/* The same over a quantized cache (int8, or int4 whose rotation moves to the queries and outputs). */
void qs_prefill_attention_quant(const float *q, long q_stride, const QuantCache *kc, const QuantCache *vc,
                                const int64_t *block_ids, int context_len, int N, int Hq, int Hkv, int D,
                                int block_size, float scale, float *out, int nthreads, int window) {
    FaArgs a = {NULL, NULL, 0, kc, vc, block_ids, context_len, N, Hq, Hkv, D, block_size, nthreads, q_stride, scale,
                window};
    fa_run(&a, q, out);
}
