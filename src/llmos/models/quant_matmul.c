/* Matrix products with GGUF-quantized weights read in place (Q4_0, Q4_1, Q8_0).
 *
 * The weights stay in GGML's block layout: each row is K/32 blocks of 32
 * weights, a Q4_0 block holds an fp16 scale d and 16 bytes of 4-bit values
 * (w = d * (q - 8)), a Q4_1 block d and an fp16 minimum m (w = d * q + m), a
 * Q8_0 block d and 32 signed bytes (w = d * q). The activations are quantized
 * per block of 32 to 16 bits: q = round(x / d) in [-32767, 32767] with
 * d = max|x| / 32767, and s = d * sum(q) kept for the offsets (llama.cpp uses
 * 8 bits here, which moves a small model's logits by several percent; 16 bits
 * keep them within ~0.1% of fp32). A block's product is then an integer dot
 * product of 16-bit pairs (AVX2 where the compiler targets it, plain C
 * otherwise) scaled once.
 *
 * Every product's output rows are shared out, in small chunks claimed one at a
 * time, between the calling thread and a persistent pool of workers (pool.h:
 * created once, spinning briefly between products, then asleep). Each output
 * element is computed the same way whoever computes it and whatever the batch,
 * so results depend neither on the thread count nor on batch composition.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pool.h"
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

#define QMAX 32767.f

/* x [M, K] -> q int16 [M, K], d and s float [M, K / 32]. */
void quantize_act_rows(const float *x, int64_t M, int64_t K, int16_t *q, float *d, float *s) {
    const int64_t nb = K / QK;
    for (int64_t i = 0; i < M * nb; i++) {
        const float *xb = x + i * QK;
        int16_t *qb = q + i * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float dd = amax / QMAX, id = dd != 0.f ? 1.f / dd : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const float r = roundf(xb[j] * id);
            const int v = (int)(r > QMAX ? QMAX : r < -QMAX ? -QMAX : r);
            qb[j] = (int16_t)v;
            sum += v;
        }
        d[i] = dd;
        s[i] = dd * (float)sum;
    }
}

#if defined(__AVX2__)
/* acc + pairwise sums of 16-bit products, as 32-bit lanes (no overflow: |w| <= 128). */
static inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
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

/* R rows of activations (K apart) against one weight row: each weight block is
 * unpacked once for the R rows. Every row's sums run in the same order for any
 * R (even and odd blocks in two accumulators, offsets by explicit fmaf), so a
 * row's result does not depend on how many rows share the call. */
static inline __attribute__((always_inline)) void block_step(
    int fmt, int R, const uint8_t *blk, int64_t b, int64_t nb, int64_t K, const int16_t *xq,
    const float *xd, const float *xs, __m256 *acc, float *off) {
    /* The weights stream from memory (a model is larger than the caches): ask for them ~2 KiB
     * ahead, which the hardware prefetcher alone does not (a third less time a product here). */
    _mm_prefetch((const char *)blk + 2048, _MM_HINT_T0);
    const float d = load_f16(blk);
    const float mo = fmt == FMT_Q4_1 ? load_f16(blk + 2) : -8.f * d;
    /* The weights as 16-bit lanes, elements 0..15 in w0 and 16..31 in w1. A Q4 block's byte j
     * holds element j (low nibble) and element j + 16 (high nibble): one widening and two
     * ALU ops split them, instead of two cross-lane widenings. */
    __m256i w0, w1;
    if (fmt == FMT_Q8_0) {
        w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
        w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));
    } else {
        const __m256i b16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + (fmt == FMT_Q4_1 ? 4 : 2))));
        w0 = _mm256_and_si256(b16, _mm256_set1_epi16(0x0f));
        w1 = _mm256_srli_epi16(b16, 4);
    }
    for (int r = 0; r < R; r++) {
        const int64_t i = r * nb + b;
        const int16_t *xb = xq + r * K + b * QK;
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)xb);
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xb + 16));
        const __m256i p = dot_s16(dot_s16(_mm256_setzero_si256(), w0, x0), w1, x1);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[i]), acc[r]);
        if (fmt != FMT_Q8_0) off[r] = fmaf(mo, xs[i], off[r]);
    }
}

static inline __attribute__((always_inline)) void rows_dot(
    int fmt, int R, const uint8_t *w, int64_t nb, int64_t K, const int16_t *xq, const float *xd,
    const float *xs, float *res, int64_t res_stride) {
    const int bb = block_bytes(fmt);
    __m256 acc0[4], acc1[4];
    float off0[4], off1[4];
    for (int r = 0; r < R; r++) {
        acc0[r] = acc1[r] = _mm256_setzero_ps();
        off0[r] = off1[r] = 0.f;
    }
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        block_step(fmt, R, w + b * bb, b, nb, K, xq, xd, xs, acc0, off0);
        block_step(fmt, R, w + (b + 1) * bb, b + 1, nb, K, xq, xd, xs, acc1, off1);
    }
    if (b < nb) block_step(fmt, R, w + b * bb, b, nb, K, xq, xd, xs, acc0, off0);
    for (int r = 0; r < R; r++)
        res[r * res_stride] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + (off0[r] + off1[r]);
}

static void row_block(int fmt, const uint8_t *wr, int64_t nb, int64_t K, int64_t M, int64_t N,
                      const int16_t *xq, const float *xd, const float *xs, float *out) {
    int64_t m = 0;
    /* Each format and row count gets its own specialised copy of rows_dot. */
#define ROWS(F)                                                                                   \
    for (; m + 4 <= M; m += 4) rows_dot(F, 4, wr, nb, K, xq + m * K, xd + m * nb, xs + m * nb, out + m * N, N); \
    for (; m < M; m++) rows_dot(F, 1, wr, nb, K, xq + m * K, xd + m * nb, xs + m * nb, out + m * N, N)
    if (fmt == FMT_Q4_1) {
        ROWS(FMT_Q4_1);
    } else if (fmt == FMT_Q4_0) {
        ROWS(FMT_Q4_0);
    } else {
        ROWS(FMT_Q8_0);
    }
#undef ROWS
}
#else
static float row_dot(int fmt, const uint8_t *w, int64_t nb, const int16_t *xq, const float *xd,
                     const float *xs) {
    const int bb = block_bytes(fmt);
    float total = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bb;
        const int16_t *x = xq + b * QK;
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

static void row_block(int fmt, const uint8_t *wr, int64_t nb, int64_t K, int64_t M, int64_t N,
                      const int16_t *xq, const float *xd, const float *xs, float *out) {
    for (int64_t m = 0; m < M; m++) out[m * N] = row_dot(fmt, wr, nb, xq + m * K, xd + m * nb, xs + m * nb);
}
#endif

struct matmul_job {
    int fmt;
    const uint8_t *w;
    int64_t N, K, M, row_bytes;
    const int16_t *xq;
    const float *xd, *xs;
    float *out;
};

static void matmul_rows(void *arg, int64_t begin, int64_t end) {
    const struct matmul_job *j = arg;
    const int64_t nb = j->K / QK;
    for (int64_t n = begin; n < end; n++)
        row_block(j->fmt, j->w + n * j->row_bytes, nb, j->K, j->M, j->N, j->xq, j->xd, j->xs, j->out + n);
}

/* out [M, N] = x [M, K] @ w [N, K]^T, x given quantized by quantize_act_rows. */
void quant_matmul(int fmt, const uint8_t *w, int64_t N, int64_t K, const int16_t *xq, const float *xd,
                  const float *xs, int64_t M, float *out) {
    struct matmul_job j = {fmt, w, N, K, M, K / QK * block_bytes(fmt), xq, xd, xs, out};
    pool_for(N, M * K, matmul_rows, &j);
}

/* out [M, N] = x [M, K] @ w [N, K]^T for float x, quantized into scratch
 * (2 * M * K bytes + 8 * M * K / 32 bytes) first. */
void quant_linear(int fmt, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M,
                  float *out, uint8_t *scratch) {
    const int64_t nb = K / QK;
    float *xd = (float *)scratch, *xs = xd + M * nb;
    int16_t *xq = (int16_t *)(xs + M * nb);
    quantize_act_rows(x, M, K, xq, xd, xs);
    quant_matmul(fmt, w, N, K, xq, xd, xs, M, out);
}

struct dequant_job {
    int fmt;
    const uint8_t *w;
    int64_t K;
    const int64_t *ids;
    float *out;
};

static void dequant_range(void *arg, int64_t begin, int64_t end) {
    const struct dequant_job *job = arg;
    const int fmt = job->fmt;
    const int64_t K = job->K, nb = K / QK, bb = block_bytes(fmt);
    for (int64_t i = begin; i < end; i++) {
        const uint8_t *row = job->w + (job->ids ? job->ids[i] : i) * nb * bb;
        float *o = job->out + i * K;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            const float d = load_f16(blk);
            float *ob = o + b * QK;
#if defined(__AVX2__)
            const __m256i q = fmt == FMT_Q8_0 ? _mm256_loadu_si256((const __m256i *)(blk + 2))
                                              : unpack_q4(blk + (fmt == FMT_Q4_1 ? 4 : 2));
            const __m256 vd = _mm256_set1_ps(d);
            const __m256 vm = _mm256_set1_ps(fmt == FMT_Q4_1 ? load_f16(blk + 2) : fmt == FMT_Q4_0 ? -8.f * d : 0.f);
            const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int j = 0; j < 4; j++) {
                const __m256i v = fmt == FMT_Q8_0 ? _mm256_cvtepi8_epi32(parts[j]) : _mm256_cvtepu8_epi32(parts[j]);
                _mm256_storeu_ps(ob + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), vd, vm));
            }
            continue;
#endif
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

/* out [n, K] = the dequantized rows ids[0..n) of w [*, K] (an embedding lookup), or rows
 * 0..n when ids is NULL. */
void dequant_rows(int fmt, const uint8_t *w, int64_t K, const int64_t *ids, int64_t n, float *out) {
    struct dequant_job j = {fmt, w, K, ids, out};
    pool_for(n, K, dequant_range, &j);
}

/* How many threads share each product, the caller included. */
void quant_set_threads(int threads) { pool_set_threads(threads); }

/* -- a decoder layer's work around attention, for a few rows at a time ----------------------
 *
 * The same operations as models/llama.py's DecoderLayer, for rows that the
 * integer kernel multiplies, in two calls instead of a dozen tensor operations
 * each: RMSNorm, the fused q/k/v product and RoPE before attention; the output
 * projection, residual, RMSNorm, gate/up product, SiLU-gated product, down
 * projection and residual after it. Every row is computed on its own, so a
 * row's result does not depend on the rows beside it.
 *
 * scratch holds, for M rows of at most `width` features: two float buffers of
 * M * width, the activations' scales and sums (2 * M * width / 32 floats) and
 * their 16-bit values (M * width int16): fused_scratch_bytes(M, width). */

int64_t fused_scratch_bytes(int64_t M, int64_t width) {
    return M * width * (4 + 4 + 2) + 2 * 4 * M * (width / QK);
}

struct fused_scratch {
    float *a, *b, *xd, *xs;
    int16_t *xq;
};

static struct fused_scratch carve(uint8_t *scratch, int64_t M, int64_t width) {
    struct fused_scratch s;
    s.a = (float *)scratch;
    s.b = s.a + M * width;
    s.xd = s.b + M * width;
    s.xs = s.xd + M * (width / QK);
    s.xq = (int16_t *)(s.xs + M * (width / QK));
    return s;
}

static void rms_norm_rows(const float *x, int64_t M, int64_t H, const float *w, float eps, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * H;
        float *o = out + m * H, ss = 0.f;
        for (int64_t i = 0; i < H; i++) ss += xr[i] * xr[i];
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) o[i] = xr[i] * r * w[i];
    }
}

/* out [M, N] = quantize(x [M, K]) @ w^T, with x's quantized form in s. */
static void product(int fmt, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M,
                    const struct fused_scratch *s, float *out) {
    quantize_act_rows(x, M, K, s->xq, s->xd, s->xs);
    quant_matmul(fmt, w, N, K, s->xq, s->xd, s->xs, M, out);
}

/* qkv [M, N] = rope(rmsnorm(x [M, H]) @ w^T + bias): the first `rotated` heads of hd features
 * (queries and keys) rotated by cos and signed sin [M, hd] (RotaryEmbedding.tables' layout:
 * r[i] = x[i] * cos[i] + x[i +- hd/2] * sin[i]). bias may be NULL. */
void fused_norm_qkv(const float *x, int64_t M, int64_t H, const float *norm_w, float eps, int fmt,
                    const uint8_t *w, int64_t N, const float *bias, const float *cos, const float *sin,
                    int64_t rotated, int64_t hd, float *qkv, uint8_t *scratch, int64_t width) {
    const struct fused_scratch s = carve(scratch, M, width);
    rms_norm_rows(x, M, H, norm_w, eps, s.a);
    product(fmt, w, N, H, s.a, M, &s, qkv);
    const int64_t half = hd / 2;
    for (int64_t m = 0; m < M; m++) {
        float *row = qkv + m * N;
        if (bias)
            for (int64_t i = 0; i < N; i++) row[i] += bias[i];
        const float *c = cos + m * hd, *sn = sin + m * hd;
        for (int64_t h = 0; h < rotated; h++) {
            float *r = row + h * hd;
            for (int64_t i = 0; i < half; i++) {
                const float lo = r[i], hi = r[i + half];
                r[i] = lo * c[i] + hi * sn[i];
                r[i + half] = hi * c[i + half] + lo * sn[i + half];
            }
        }
    }
}

/* out [M, H] = y + down(silu(gate) * up) where y = x + o(attn) and gate, up = gate_up(rmsnorm(y)):
 * attn [M, A]; gate_up's N = 2 * I (gate rows first); down [H, I]. */
void fused_out_mlp(const float *x, const float *attn, int64_t M, int64_t H, int64_t A, int o_fmt,
                   const uint8_t *o_w, const float *norm_w, float eps, int gu_fmt, const uint8_t *gu_w,
                   int64_t I, int down_fmt, const uint8_t *down_w, float *out, uint8_t *scratch,
                   int64_t width) {
    const struct fused_scratch s = carve(scratch, M, width);
    product(o_fmt, o_w, H, A, attn, M, &s, out);
    for (int64_t i = 0; i < M * H; i++) out[i] = x[i] + out[i];
    rms_norm_rows(out, M, H, norm_w, eps, s.a);
    product(gu_fmt, gu_w, 2 * I, H, s.a, M, &s, s.b);
    for (int64_t m = 0; m < M; m++) {
        const float *gate = s.b + m * 2 * I, *up = gate + I;
        float *act = s.a + m * I;
        for (int64_t i = 0; i < I; i++) act[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
    }
    product(down_fmt, down_w, H, I, s.a, M, &s, s.b);
    for (int64_t i = 0; i < M * H; i++) out[i] += s.b[i];
}

/* The pool's parallel-for, for other kernels (engine/paged_attention.c) to share it. */
void quant_parallel_for(int64_t n, int64_t cost, pool_task fn, void *arg) { pool_for(n, cost, fn, arg); }
