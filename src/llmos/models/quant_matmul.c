/* Matrix products with GGUF-quantized weights read in place (Q4_0, Q4_1, Q8_0).
 *
 * The weights stay in GGML's block layout: each row is K/32 blocks of 32
 * weights, a Q4_0 block holds an fp16 scale d and 16 bytes of 4-bit values
 * (w = d * (q - 8)), a Q4_1 block d and an fp16 minimum m (w = d * q + m), a
 * Q8_0 block d and 32 signed bytes (w = d * q). The activations are quantized
 * the same way as llama.cpp's: per block of 32, q = round(x / d) in [-127, 127]
 * with d = max|x| / 127, and s = d * sum(q) kept for the offsets. A block's
 * product is then one integer dot product (VNNI or AVX2 where the compiler
 * targets them, plain C otherwise) scaled once. Rows of the output are split
 * across OpenMP threads; each output element is computed the same way whatever
 * the thread count or batch, so results do not depend on batch composition.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { FMT_Q4_0 = 2, FMT_Q4_1 = 3, FMT_Q8_0 = 8 }; /* GGML's type ids */
#define QK 32

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 113;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float load_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

static int block_bytes(int fmt) {
    return fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : fmt == FMT_Q8_0 ? 34 : 0;
}

/* x [M, K] -> q int8 [M, K], d and s float [M, K / 32]. */
void quantize_q8_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *d, float *s) {
    const int64_t nb = K / QK;
    for (int64_t i = 0; i < M * nb; i++) {
        const float *xb = x + i * QK;
        int8_t *qb = q + i * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int v = (int)roundf(xb[j] * id);
            qb[j] = (int8_t)v;
            sum += v;
        }
        d[i] = dd;
        s[i] = dd * (float)sum;
    }
}

#if defined(__AVX2__)
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i v) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, v);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, v);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), _mm256_set1_epi16(1)));
#endif
}

static inline __m256i unpack_q4(const uint8_t *qs) {
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    const __m128i m = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

static inline float hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* The integer dot product of weight block b of a row with activation block b. */
static inline __m256i block_dot(int fmt, const uint8_t *blk, const int8_t *xq) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i zero = _mm256_setzero_si256();
    if (fmt == FMT_Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
        return dot_u8s8(zero, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    }
    return dot_u8s8(zero, unpack_q4(blk + (fmt == FMT_Q4_1 ? 4 : 2)), x);
}

static float row_dot(int fmt, const uint8_t *w, int64_t nb, const int8_t *xq, const float *xd,
                     const float *xs) {
    const int bb = block_bytes(fmt);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float off = 0.f;
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *b0 = w + b * bb, *b1 = b0 + bb;
        const float d0 = load_f16(b0), d1 = load_f16(b1);
        const __m256 p0 = _mm256_cvtepi32_ps(block_dot(fmt, b0, xq + b * QK));
        const __m256 p1 = _mm256_cvtepi32_ps(block_dot(fmt, b1, xq + (b + 1) * QK));
        acc0 = _mm256_fmadd_ps(p0, _mm256_set1_ps(d0 * xd[b]), acc0);
        acc1 = _mm256_fmadd_ps(p1, _mm256_set1_ps(d1 * xd[b + 1]), acc1);
        if (fmt == FMT_Q4_1) off += load_f16(b0 + 2) * xs[b] + load_f16(b1 + 2) * xs[b + 1];
        else if (fmt == FMT_Q4_0) off -= 8.f * (d0 * xs[b] + d1 * xs[b + 1]);
    }
    for (; b < nb; b++) {
        const uint8_t *b0 = w + b * bb;
        const float d0 = load_f16(b0);
        const __m256 p0 = _mm256_cvtepi32_ps(block_dot(fmt, b0, xq + b * QK));
        acc0 = _mm256_fmadd_ps(p0, _mm256_set1_ps(d0 * xd[b]), acc0);
        if (fmt == FMT_Q4_1) off += load_f16(b0 + 2) * xs[b];
        else if (fmt == FMT_Q4_0) off -= 8.f * d0 * xs[b];
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + off;
}
#else
static float row_dot(int fmt, const uint8_t *w, int64_t nb, const int8_t *xq, const float *xd,
                     const float *xs) {
    const int bb = block_bytes(fmt);
    float total = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bb;
        const int8_t *x = xq + b * QK;
        const float d = load_f16(blk);
        int dot = 0;
        if (fmt == FMT_Q8_0) {
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int j = 0; j < QK; j++) dot += q[j] * x[j];
            total += d * xd[b] * (float)dot;
        } else {
            const uint8_t *qs = blk + (fmt == FMT_Q4_1 ? 4 : 2);
            for (int j = 0; j < QK / 2; j++) dot += (qs[j] & 0x0f) * x[j] + (qs[j] >> 4) * x[j + QK / 2];
            total += d * xd[b] * (float)dot;
            total += fmt == FMT_Q4_1 ? load_f16(blk + 2) * xs[b] : -8.f * d * xs[b];
        }
    }
    return total;
}
#endif

/* out [M, N] = x [M, K] @ w [N, K]^T, x given quantized by quantize_q8_rows. */
void quant_matmul(int fmt, const uint8_t *w, int64_t N, int64_t K, const int8_t *xq, const float *xd,
                  const float *xs, int64_t M, float *out) {
    const int64_t nb = K / QK, row_bytes = nb * block_bytes(fmt);
#pragma omp parallel for schedule(static) if (N * M * K >= 65536)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * row_bytes;
        for (int64_t m = 0; m < M; m++)
            out[m * N + n] = row_dot(fmt, wr, nb, xq + m * K, xd + m * nb, xs + m * nb);
    }
}

/* out [M, N] = x [M, K] @ w [N, K]^T for float x, quantized into scratch
 * (M * K bytes + 8 * M * K / 32 bytes) first. */
void quant_linear(int fmt, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M,
                  float *out, uint8_t *scratch) {
    const int64_t nb = K / QK;
    float *xd = (float *)scratch, *xs = xd + M * nb;
    int8_t *xq = (int8_t *)(xs + M * nb);
    quantize_q8_rows(x, M, K, xq, xd, xs);
    quant_matmul(fmt, w, N, K, xq, xd, xs, M, out);
}

/* out [n, K] = the dequantized rows ids[0..n) of w [*, K] (an embedding lookup). */
void dequant_rows(int fmt, const uint8_t *w, int64_t K, const int64_t *ids, int64_t n, float *out) {
    const int64_t nb = K / QK, bb = block_bytes(fmt);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = w + ids[i] * nb * bb;
        float *o = out + i * K;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            const float d = load_f16(blk);
            float *ob = o + b * QK;
            if (fmt == FMT_Q8_0) {
                const int8_t *q = (const int8_t *)(blk + 2);
                for (int j = 0; j < QK; j++) ob[j] = d * q[j];
            } else {
                const float m = fmt == FMT_Q4_1 ? load_f16(blk + 2) : -8.f * d;
                const uint8_t *qs = blk + (fmt == FMT_Q4_1 ? 4 : 2);
                for (int j = 0; j < QK / 2; j++) {
                    ob[j] = d * (qs[j] & 0x0f) + m;
                    ob[j + QK / 2] = d * (qs[j] >> 4) + m;
                }
            }
        }
    }
}
