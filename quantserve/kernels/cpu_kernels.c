/* quantserve CPU kernels (x86 AVX2 + FMA, OpenMP), built once per instruction set: the avx512
 * build (F/BW/VL + VNNI) takes the VNNI paths below, the avx2 build the AVX2 ones. Integer
 * sums are exact either way, so both builds give bit-identical results.
 *
 * Each result row is computed in an order that does not depend on how many rows are in the
 * batch, so a request gets bit-identical numbers alone or batched.
 *
 * Weight and cache types (wtype / ctype): 0 = float32, 1 = bfloat16 (upper half of a float32),
 * 2 = float16 (IEEE half, converted with F16C).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };

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

/* x: [M, K] float32; packed: [ceil(N / 16), K, 16] (wtype); bias: [N] or NULL; y: [M, N]. */
void qs_linear(const float *x, int M, int K, const void *packed, int wtype, const float *bias,
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

static inline float dot(const float *a, const void *b, int ctype, long off, int D) {
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
static inline void dot8(const float *qv, const void *k_cache, int ctype, long off, long kstride, int D,
                        float scale, float *scores) {
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

/* Scores of the G query heads of KV head h against every context token, then softmax. */
static void scores_softmax(const float *const *qg, int G, const void *k_cache, int ctype,
                           const int64_t *table, long L, int block_size, int Hkv, int h, int D,
                           float scale, float *scores) {
    long kstride = (long)Hkv * D;
    for (long t0 = 0, blk = 0; t0 < L; t0 += block_size, blk++) {
        long n = L - t0 < block_size ? L - t0 : block_size;
        long base = (table[blk] * block_size * Hkv + h) * (long)D;
        for (int g = 0; g < G; g++) {
            long i = 0;
            for (; i + 8 <= n; i += 8)
                dot8(qg[g], k_cache, ctype, base + i * kstride, kstride, D, scale, scores + g * L + t0 + i);
            for (; i < n; i++)
                scores[g * L + t0 + i] = dot(qg[g], k_cache, ctype, base + i * kstride, D) * scale;
        }
    }
    for (int g = 0; g < G; g++) softmax_inplace(scores + g * L, L);
}

/* out[g] = sum_t p[g][t] v[t]; 64 lanes of D at a time held in 8 registers, t in order. */
static void weighted_values(const float *scores, int G, const void *v_cache, int ctype,
                            const int64_t *table, long L, int block_size, int Hkv, int h, int D,
                            float *const *og) {
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
                for (long i = 0; i < n; i++) {
                    __m256 pv = _mm256_set1_ps(p[t0 + i]);
                    long off = base + i * vstride;
                    for (int j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(pv, load8(v_cache, ctype, off + 8 * j), acc[j]);
                }
            }
            for (int j = 0; j < nv; j++) _mm256_storeu_ps(og[g] + d0 + 8 * j, acc[j]);
        }
    }
}

/* One query token per sequence against its paged context.
 * q: [B, Hq, D] (row stride q_stride floats); k_cache, v_cache: [num_blocks, block_size, Hkv, D]
 * (ctype); block_tables: [B, max_blocks]; context_lens: [B]; out: [B, Hq, D].
 * D % 16 == 0, Hq / Hkv <= 16. */
void qs_decode_attention(const float *q, long q_stride, const void *k_cache, const void *v_cache, int ctype,
                         const int64_t *block_tables, const int64_t *context_lens, int B, int Hq,
                         int Hkv, int D, int block_size, int max_blocks, float scale, float *out,
                         int nthreads) {
    int G = Hq / Hkv;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(nthreads)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hkv; h++) {
            long L = context_lens[b];
            const int64_t *table = block_tables + (long)b * max_blocks;
            const float *qg[MAX_GROUP];
            float *og[MAX_GROUP];
            for (int g = 0; g < G; g++) {
                qg[g] = q + (long)b * q_stride + (long)(h * G + g) * D;
                og[g] = out + ((long)b * Hq + h * G + g) * D;
            }
            float *scores = malloc(sizeof(float) * G * L);
            scores_softmax(qg, G, k_cache, ctype, table, L, block_size, Hkv, h, D, scale, scores);
            weighted_values(scores, G, v_cache, ctype, table, L, block_size, Hkv, h, D, og);
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
 * `stride` floats), x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the two halves of D.
 * cos/sin: [P, D] tables (halves duplicated). */
void qs_rope(float *x, int T, long stride, int heads, int D, const int64_t *positions,
             const float *cos_t, const float *sin_t) {
    int half = D / 2;
    for (int t = 0; t < T; t++) {
        const float *c = cos_t + positions[t] * D, *s = sin_t + positions[t] * D;
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
} LayerWeights;

static void run_linear(const LinearWeights *lw, int wtype, const float *x, int M, int K, const float *bias,
                       float *y, int N, int nthreads) {
    if (lw->bits)
        qs_linear_q(x, M, K, lw->w, lw->bits, lw->scales, lw->mins, lw->group_size, bias, y, N, nthreads);
    else
        qs_linear(x, M, K, lw->w, wtype, bias, y, N, nthreads);
}

typedef struct {
    int T, H, Hq, Hkv, D, I, wtype, ctype, block_size, max_blocks, nthreads;
    float eps, scale;
    const int64_t *positions, *slots, *block_tables, *context_lens;   /* [T], [T], [T, max_blocks], [T] */
    const float *cos, *sin;                                            /* [P, D] */
    void *k_cache, *v_cache;                     /* [L, num_blocks, block_size, Hkv, D] (ctype) */
    long layer_stride;                           /* elements between layers of the cache */
    int kv_bits;                                 /* 0: float cache; 4 / 8: quantized (k_cache = codes) */
    uint16_t *k_scale, *v_scale;                 /* [L, num_blocks, block_size, Hkv] when quantized */
    uint8_t *k_zero, *v_zero;
    long k_param_stride, v_param_stride;         /* elements between layers of scale / zero */
    int k_groups, v_groups;
} DecodeBatch;

/* ---- quantized KV cache (see quantserve/kvcache/quant.py for the scheme) ----------------- */

#define MAX_HEAD_DIM 256

typedef struct {
    void *data;          /* [num_blocks, block_size, Hkv, D] uint8 (int8) or [.., D/2] (int4) */
    uint16_t *scale;     /* [num_blocks, block_size, Hkv] float16 */
    uint8_t *zero;       /* [num_blocks, block_size, Hkv] */
    int bits;
    int groups;          /* 1, or 2 = one scale / zero per half of the head ([..., Hkv, 2]) */
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

/* Codes of x[n] for one group: scale (float16, rounded up) and integer zero written at `param`. */
static void quantize_group(const float *x, int n, const QuantCache *c, long param, uint8_t *q) {
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
                       void *data, uint16_t *scale, uint8_t *zero, int bits, int groups) {
    QuantCache c = {data, scale, zero, bits, groups};
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
                               int nthreads) {
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
            float *p = malloc(sizeof(float) * L);
            for (long t = 0; t < L; t++) {
                long row = (table[t / block_size] * block_size + t % block_size) * Hkv + h;
                p[t] = key_score(qv, qsum, kc, row, D) * scale;
            }
            softmax_inplace(p, L);
            __m256 acc[MAX_HEAD_DIM / 8];
            for (int j = 0; j < D / 8; j++) acc[j] = _mm256_setzero_ps();
            float shift = 0.0f;
            for (long t = 0; t < L; t++) {
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
        QuantCache kc = {(uint8_t *)b->k_cache + lo, b->k_scale + kp, b->k_zero + kp, b->kv_bits, b->k_groups};
        QuantCache vc = {(uint8_t *)b->v_cache + lo, b->v_scale + vp, b->v_zero + vp, b->kv_bits, b->v_groups};
        qs_kv_write_quant(qkv + qd, nqkv, T, b->Hkv, b->D, b->slots, kc.data, kc.scale, kc.zero, b->kv_bits,
                          b->k_groups);
        qs_kv_write_quant(qkv + qd + kvd, nqkv, T, b->Hkv, b->D, b->slots, vc.data, vc.scale, vc.zero, b->kv_bits,
                          b->v_groups);
        qs_decode_attention_quant(qkv, nqkv, &kc, &vc, b->block_tables, b->context_lens, T, b->Hq, b->Hkv, b->D,
                                  b->block_size, b->max_blocks, b->scale, attn, b->nthreads);
        return;
    }
    void *kc = cache_layer(b->k_cache, b->ctype, l * b->layer_stride);
    void *vc = cache_layer(b->v_cache, b->ctype, l * b->layer_stride);
    qs_kv_write(qkv + qd, nqkv, T, kvd, b->slots, kc, b->ctype);
    qs_kv_write(qkv + qd + kvd, nqkv, T, kvd, b->slots, vc, b->ctype);
    qs_decode_attention(qkv, nqkv, kc, vc, b->ctype, b->block_tables, b->context_lens, T, b->Hq, b->Hkv, b->D,
                        b->block_size, b->max_blocks, b->scale, attn, b->nthreads);
}

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
        if (l == 0) {
            memcpy(residual, x, sizeof(float) * T * H);
            qs_add_rmsnorm(x, NULL, w->attn_norm, b->eps, h, T, H);
        } else {
            qs_add_rmsnorm(x, residual, w->attn_norm, b->eps, h, T, H);
        }
        run_linear(&w->qkv, b->wtype, h, T, H, w->qkv_bias, qkv, nqkv, b->nthreads);
        qs_rope(qkv, T, nqkv, b->Hq + b->Hkv, b->D, b->positions, b->cos, b->sin);
        attend(b, l, qkv, nqkv, qd, kvd, attn);
        run_linear(&w->o, b->wtype, attn, T, qd, w->o_bias, x, H, b->nthreads);
        qs_add_rmsnorm(x, residual, w->mlp_norm, b->eps, h, T, H);
        run_linear(&w->gate_up, b->wtype, h, T, H, NULL, gu, 2 * b->I, b->nthreads);
        qs_silu_mul(gu, act, T, b->I);
        run_linear(&w->down, b->wtype, act, T, b->I, NULL, x, H, b->nthreads);
    }
    free(h); free(qkv); free(attn); free(gu); free(act);
}

