/* Matrix products with GGUF-quantized weights read in place (Q4_0, Q4_1, Q8_0).
 *
 * The weights are kept in a kernel layout made once at load (quant_pack, from
 * quant.py's GGMLWeight.pack; QuantWeight.to_ggml undoes it): rows in groups of 16,
 * and for each group and block of 32 columns, the 16 rows' fp16 scales d, for
 * Q4_1 their fp16 minimums m, then their quantized values as unsigned bytes
 * four columns to a 32-bit lane, one lane per row:
 *   Q4: 4 chunks of 64 bytes; chunk c's byte 4n + j holds row n's column 8c + j
 *       in its low nibble and column 8c + 4 + j in its high nibble (w = d q + m
 *       for Q4_1, d (q - 8) for Q4_0);
 *   Q8_0: 8 chunks of 64 bytes; chunk c's byte 4n + j holds q + 128 for row n's
 *       column 4c + j (w = d q).
 * So a 64-byte load and at most two ALU ops give one operand of a VNNI dot
 * product (vpdpbusd: 16 lanes, each four unsigned bytes times four signed
 * bytes, summed into 32 bits) for 16 output rows at once, and the scales of
 * the 16 rows are one vector. Rows past the weight's end are zero.
 *
 * The activations are quantized per row and block of 32 to 15 bits: q =
 * round(x / dx) in [-16383, 16383], dx = max|x| / 16383, split as q = 128 hi
 * + lo into two signed bytes (hi in [-128, 127], lo in [0, 127]), with the
 * block's integer sum kept for the offsets. (llama.cpp uses 8 bits here, which
 * moves a small model's logits by several percent; 15 bits keep them within
 * ~0.1% of fp32.) A block's product for one row and 16 weight rows is then
 * exact in integers, 128 (w . hi) + (w . lo) - offset * sum(q), converted and
 * scaled once by d dx; Q4_1 adds m dx sum(q).
 *
 * A product's work items, (group of 16 weight rows, panel of 64 activation
 * rows: a few hundred KiB that stay in L2 while every group passes), are
 * shared out in small chunks claimed one at a time between the calling thread
 * and a persistent pool of workers (pool.h). Each output element is computed the same way whoever
 * computes it and whatever the batch (the integers are exact, and the float
 * steps run in one order per element), so results depend neither on the
 * thread count nor on batch composition, and the portable C path (no AVX-512
 * VNNI, or QUANT_PORTABLE defined) gives the same bits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pool.h"
#include "vexp.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(QUANT_PORTABLE)
#define QUANT_VNNI 1
#include <immintrin.h>
#endif

enum { FMT_Q4_0 = 2, FMT_Q4_1 = 3, FMT_Q8_0 = 8 }; /* GGML's type ids */
#define QK 32      /* columns per block */
#define GROUP 16   /* weight rows per group */
#define QMAX 16383 /* the activations' largest magnitude */

/* Bytes of one block of one group of 16 rows: scales (and minimums), then values. */
int quant_block_bytes(int fmt) {
    return fmt == FMT_Q4_0 ? 288 : fmt == FMT_Q4_1 ? 320 : fmt == FMT_Q8_0 ? 544 : 0;
}

static inline int values_at(int fmt) { return fmt == FMT_Q4_1 ? 64 : 32; }

/* The integer offset of the stored values: w = d (stored - offset) (+ m for Q4_1). */
static inline int int_offset(int fmt) { return fmt == FMT_Q4_0 ? 8 : fmt == FMT_Q8_0 ? 128 : 0; }

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

/* Row n's stored value (0..255) for column k of a block's values. */
static inline int stored_value(int fmt, const uint8_t *values, int n, int k) {
    if (fmt == FMT_Q8_0) return values[64 * (k / 4) + 4 * n + k % 4];
    const uint8_t byte = values[64 * (k / 8) + 4 * n + k % 4];
    return k % 8 < 4 ? byte & 0x0f : byte >> 4;
}

/* -- the layout ------------------------------------------------------------------------------- */

struct pack_job {
    int fmt;
    const uint8_t *src;
    int64_t nb;
    uint8_t *dst;
};

static void pack_rows(void *arg, int64_t begin, int64_t end) {
    const struct pack_job *j = arg;
    const int fmt = j->fmt, bb = quant_block_bytes(fmt);
    const int src_bytes = fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : 34;
    for (int64_t row = begin; row < end; row++) {
        const int n = (int)(row % GROUP);
        for (int64_t b = 0; b < j->nb; b++) {
            const uint8_t *src = j->src + (row * j->nb + b) * src_bytes;
            uint8_t *blk = j->dst + (row / GROUP * j->nb + b) * bb, *vals = blk + values_at(fmt);
            memcpy(blk + 2 * n, src, 2);
            if (fmt == FMT_Q4_1) memcpy(blk + 32 + 2 * n, src + 2, 2);
            for (int k = 0; k < QK; k++) {
                if (fmt == FMT_Q8_0) {
                    vals[64 * (k / 4) + 4 * n + k % 4] = src[2 + k] ^ 0x80;
                } else { /* GGML's byte j: column j in the low nibble, j + 16 in the high one */
                    const uint8_t *qs = src + (fmt == FMT_Q4_1 ? 4 : 2);
                    const int q = k < 16 ? qs[k] & 0x0f : qs[k - 16] >> 4;
                    vals[64 * (k / 8) + 4 * n + k % 4] |= (uint8_t)(k % 8 < 4 ? q : q << 4);
                }
            }
        }
    }
}

/* dst (ceil(rows / 16) * nb * quant_block_bytes(fmt) bytes) = src's rows [rows, nb GGML blocks]
 * in the kernel layout; the rows that fill the last group are zero. */
void quant_pack(int fmt, const uint8_t *src, int64_t rows, int64_t nb, uint8_t *dst) {
    memset(dst, 0, (size_t)((rows + GROUP - 1) / GROUP * nb * quant_block_bytes(fmt)));
    struct pack_job j = {fmt, src, nb, dst};
    pool_for(rows, nb * QK, pack_rows, &j);
}

/* -- activations ------------------------------------------------------------------------------ */

/* The activations quantized, in tiles of 8 rows: for each tile and block of 32 columns, the
 * high bytes then the low bytes of each group of 4 columns, row after row (so a kernel reads
 * every operand at a constant offset from one pointer), then the rows' scales d, d * sum(q) and
 * sum(q). Rows past M are zero. */
#define TILE 8
struct act_block {
    int8_t q[QK / 4][2][TILE][4]; /* [column group][hi, lo][row][column in group] */
    float d[TILE], s[TILE];
    int32_t sum[TILE];
};

int64_t quant_act_bytes(int64_t M, int64_t K) {
    return (M + TILE - 1) / TILE * (K / QK) * (int64_t)sizeof(struct act_block);
}

/* One block of 32 activations -> v = round(x / d) in [-QMAX, QMAX] with d = max|x| / QMAX
 * (rounded to nearest even). A block with an infinity or a NaN gets v = 0 and d = NaN, so
 * the products it enters are NaN, as in float arithmetic. Plain loops over 32 lanes, which the
 * compiler vectorizes. */
static inline float quantize_block(const float *x, int32_t *v) {
    uint32_t bits[QK], top = 0;
    memcpy(bits, x, sizeof bits);
    for (int j = 0; j < QK; j++) top = (bits[j] & 0x7fffffffu) > top ? bits[j] & 0x7fffffffu : top;
    float amax;
    memcpy(&amax, &top, 4);
    if (!(amax <= 3.4028234e38f)) { /* inf or NaN */
        for (int j = 0; j < QK; j++) v[j] = 0;
        return __builtin_nanf("");
    }
    const float d = amax / (float)QMAX, id = d != 0.f ? 1.f / d : 0.f;
    for (int j = 0; j < QK; j++) {
        const float r = __builtin_rintf(x[j] * id);
        v[j] = (int32_t)(r > QMAX ? QMAX : r < -QMAX ? -QMAX : r);
    }
    return d;
}

struct quantize_job {
    const float *x;
    int64_t M, K;
    struct act_block *act;
};

/* Tiles [begin, end) of the activations (a tile's rows share cache lines: one thread a tile). */
static void quantize_tiles(void *arg, int64_t begin, int64_t end) {
    const struct quantize_job *j = arg;
    const int64_t nb = j->K / QK;
    for (int64_t m = begin * TILE; m < j->M && m < end * TILE; m++) {
        const int r = (int)(m % TILE);
        for (int64_t b = 0; b < nb; b++) {
            struct act_block *blk = j->act + m / TILE * nb + b;
            int32_t v[QK], sum = 0;
            const float d = quantize_block(j->x + m * j->K + b * QK, v);
            int8_t hi[QK], lo[QK];
            for (int i = 0; i < QK; i++) {
                hi[i] = (int8_t)(v[i] >> 7); /* floor(v / 128): arithmetic shift */
                lo[i] = (int8_t)(v[i] & 127);
                sum += v[i];
            }
            for (int g = 0; g < QK / 4; g++) {
                memcpy(blk->q[g][0][r], hi + 4 * g, 4);
                memcpy(blk->q[g][1][r], lo + 4 * g, 4);
            }
            blk->d[r] = d;
            blk->s[r] = d * (float)sum;
            blk->sum[r] = sum;
        }
    }
}

static void act_quantize(const float *x, int64_t M, int64_t K, struct act_block *act) {
    if (M % TILE) /* the last tile's missing rows read as zero */
        memset(act + M / TILE * (K / QK), 0, (size_t)(K / QK) * sizeof(struct act_block));
    struct quantize_job j = {x, M, K, act};
    pool_for((M + TILE - 1) / TILE, TILE * K, quantize_tiles, &j);
}

/* For tests: x [M, K] -> q = 128 hi + lo [M, K] and the scales d, d * sum(q) [M, K/32], as the
 * kernel sees them (scratch: quant_act_bytes(M, K)). */
void quantize_act_rows(const float *x, int64_t M, int64_t K, uint8_t *scratch, int16_t *q, float *d,
                       float *s) {
    struct act_block *act = (struct act_block *)scratch;
    const int64_t nb = K / QK;
    act_quantize(x, M, K, act);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const struct act_block *blk = act + m / TILE * nb + b;
            const int r = (int)(m % TILE);
            for (int j = 0; j < QK; j++)
                q[m * K + b * QK + j] = (int16_t)(128 * blk->q[j / 4][0][r][j % 4] + blk->q[j / 4][1][r][j % 4]);
            d[m * nb + b] = blk->d[r];
            s[m * nb + b] = blk->s[r];
        }
    }
}

/* -- the product ------------------------------------------------------------------------------ */

#if defined(QUANT_VNNI)
static inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* out[r, 0..valid) for the first R rows of an activation tile against one group of 16 weight
 * rows. Per block, each row's integer sum takes the high bytes' products, is shifted left 7
 * bits, then takes the low bytes' products: 128 (w . hi) + (w . lo) in one register. */
static inline __attribute__((always_inline)) void group_rows(
    int fmt, int R, const uint8_t *wg, const struct act_block *act, int64_t nb, float *out, int64_t ldo,
    int valid) {
    const int bb = quant_block_bytes(fmt), off = int_offset(fmt);
    __m512 acc[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = wg + b * bb, *vals = blk + values_at(fmt);
        const struct act_block *x = act + b;
        /* The weights stream from memory (a model is larger than the caches): ask for them a
         * few blocks ahead, which the hardware prefetcher alone does not. */
        for (int o = 0; o < bb; o += 64) _mm_prefetch((const char *)blk + 4 * bb + o, _MM_HINT_T0);
        __m512i w[8]; /* the block's values as dpbusd operands, four columns a lane */
        if (fmt == FMT_Q8_0) {
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) w[c] = _mm512_loadu_si512(vals + 64 * c);
        } else {
            const __m512i nibble = _mm512_set1_epi8(0x0f);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const __m512i raw = _mm512_loadu_si512(vals + 64 * c);
                w[2 * c] = _mm512_and_si512(raw, nibble);
                w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
            }
        }
        __m512i t[TILE];
        for (int r = 0; r < R; r++) t[r] = _mm512_setzero_si512();
#pragma GCC unroll 2
        for (int half = 0; half < 2; half++) {
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++)
                for (int r = 0; r < R; r++) t[r] = _mm512_dpbusd_epi32(t[r], w[g], bcast4(x->q[g][half][r]));
            if (half == 0)
                for (int r = 0; r < R; r++) t[r] = _mm512_slli_epi32(t[r], 7);
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        const __m512 mv = fmt == FMT_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                          : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            if (off) t[r] = _mm512_sub_epi32(t[r], _mm512_set1_epi32(off * x->sum[r]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[r]), _mm512_mul_ps(dv, _mm512_set1_ps(x->d[r])), acc[r]);
            if (fmt == FMT_Q4_1) acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(x->s[r]), acc[r]);
        }
    }
    const __mmask16 mask = (__mmask16)((1u << valid) - 1);
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(out + r * ldo, mask, acc[r]);
}
#else
/* The same steps in portable C, one output element at a time (the same bits). */
static inline void group_rows(int fmt, int R, const uint8_t *wg, const struct act_block *act, int64_t nb,
                              float *out, int64_t ldo, int valid) {
    const int bb = quant_block_bytes(fmt), off = int_offset(fmt);
    for (int r = 0; r < R; r++) {
        float acc[GROUP] = {0};
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = wg + b * bb, *vals = blk + values_at(fmt);
            const struct act_block *x = act + b;
            for (int n = 0; n < GROUP; n++) {
                int32_t h = 0, l = 0;
                for (int k = 0; k < QK; k++) {
                    const int v = stored_value(fmt, vals, n, k);
                    h += v * x->q[k / 4][0][r][k % 4];
                    l += v * x->q[k / 4][1][r][k % 4];
                }
                const int32_t t = 128 * h + l - off * x->sum[r];
                acc[n] = fmaf((float)t, load_f16(blk + 2 * n) * x->d[r], acc[n]);
                if (fmt == FMT_Q4_1) acc[n] = fmaf(load_f16(blk + 32 + 2 * n), x->s[r], acc[n]);
            }
        }
        for (int n = 0; n < valid; n++) out[r * ldo + n] = acc[n];
    }
}
#endif

struct matmul_job {
    int fmt;
    const uint8_t *w;
    int64_t N, M, nb, groups;
    const struct act_block *act;
    float *out;
};

/* Rows of activations a work item takes: 8 tiles (a few hundred KiB of quantized
 * activations, which stay in the L2 cache while every group of weights passes them). */
#define PANEL (8 * TILE)

/* Work items [begin, end): item i is group i % groups of weight rows against panel i / groups of
 * activation rows, so consecutive items share a panel. */
static inline __attribute__((always_inline)) void items_of(int fmt, const struct matmul_job *j,
                                                           int64_t begin, int64_t end) {
    const int64_t nb = j->nb, M = j->M, N = j->N;
    for (int64_t item = begin; item < end; item++) {
        const int64_t g = item % j->groups, m_end = (item / j->groups + 1) * PANEL;
        const uint8_t *wg = j->w + g * nb * quant_block_bytes(fmt);
        const int valid = (int)(N - g * GROUP < GROUP ? N - g * GROUP : GROUP);
        for (int64_t m = m_end - PANEL; m < M && m < m_end; m += TILE) {
            const struct act_block *x = j->act + m / TILE * nb;
            float *out = j->out + m * N + g * GROUP;
            switch (M - m < TILE ? M - m : TILE) { /* each row count gets its own specialised copy */
            case 8: group_rows(fmt, 8, wg, x, nb, out, N, valid); break;
            case 7: group_rows(fmt, 7, wg, x, nb, out, N, valid); break;
            case 6: group_rows(fmt, 6, wg, x, nb, out, N, valid); break;
            case 5: group_rows(fmt, 5, wg, x, nb, out, N, valid); break;
            case 4: group_rows(fmt, 4, wg, x, nb, out, N, valid); break;
            case 3: group_rows(fmt, 3, wg, x, nb, out, N, valid); break;
            case 2: group_rows(fmt, 2, wg, x, nb, out, N, valid); break;
            default: group_rows(fmt, 1, wg, x, nb, out, N, valid); break;
            }
        }
    }
}

static void matmul_items(void *arg, int64_t begin, int64_t end) {
    const struct matmul_job *j = arg;
    if (j->fmt == FMT_Q4_1) items_of(FMT_Q4_1, j, begin, end);
    else if (j->fmt == FMT_Q4_0) items_of(FMT_Q4_0, j, begin, end);
    else items_of(FMT_Q8_0, j, begin, end);
}

/* out [M, N] = x [M, K] @ w [N, K]^T, x quantized into scratch (quant_act_bytes(M, K)) first. */
void quant_linear(int fmt, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M,
                  float *out, uint8_t *scratch) {
    struct act_block *act = (struct act_block *)scratch;
    act_quantize(x, M, K, act);
    const int64_t groups = (N + GROUP - 1) / GROUP, panels = (M + PANEL - 1) / PANEL;
    struct matmul_job j = {fmt, w, N, M, K / QK, groups, act, out};
    pool_for(groups * panels, GROUP * (M < PANEL ? M : PANEL) * K, matmul_items, &j);
}

/* -- rows as floats: an embedding lookup ------------------------------------------------------- */

struct dequant_job {
    int fmt;
    const uint8_t *w;
    int64_t K;
    const int64_t *ids;
    float *out;
};

static void dequant_range(void *arg, int64_t begin, int64_t end) {
    const struct dequant_job *job = arg;
    const int fmt = job->fmt, bb = quant_block_bytes(fmt), off = int_offset(fmt);
    const int64_t K = job->K, nb = K / QK;
    for (int64_t i = begin; i < end; i++) {
        const int64_t row = job->ids ? job->ids[i] : i;
        const int n = (int)(row % GROUP);
        const uint8_t *wg = job->w + row / GROUP * nb * bb;
        float *o = job->out + i * K;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = wg + b * bb, *vals = blk + values_at(fmt);
            const float d = load_f16(blk + 2 * n), m = fmt == FMT_Q4_1 ? load_f16(blk + 32 + 2 * n) : 0.f;
            for (int k = 0; k < QK; k++) o[b * QK + k] = d * (float)(stored_value(fmt, vals, n, k) - off) + m;
        }
    }
}

/* out [n, K] = the rows ids[0..n) of w [*, K] as floats (an embedding lookup), or rows 0..n
 * when ids is NULL. */
void dequant_rows(int fmt, const uint8_t *w, int64_t K, const int64_t *ids, int64_t n, float *out) {
    struct dequant_job j = {fmt, w, K, ids, out};
    pool_for(n, K, dequant_range, &j);
}

/* How many threads share each product, the caller included. */
void quant_set_threads(int threads) { pool_set_threads(threads); }

/* Whether this build multiplies with AVX-512 VNNI (else portable C). */
int quant_vectorized(void) {
#if defined(QUANT_VNNI)
    return 1;
#else
    return 0;
#endif
}

/* -- a decoder layer's work around attention ------------------------------------------------
 *
 * The same operations as models/llama.py's DecoderLayer, for rows that the
 * integer kernel multiplies, in two calls instead of a dozen tensor operations
 * each: RMSNorm, the fused q/k/v product and RoPE before attention; the output
 * projection, residual, RMSNorm, gate/up product, SiLU-gated product, down
 * projection and residual after it. Every row is computed on its own, so a
 * row's result does not depend on the rows beside it.
 *
 * scratch holds, for M rows of at most `width` features, two float buffers of
 * M * width and the quantized activations: fused_scratch_bytes(M, width). */

int64_t fused_scratch_bytes(int64_t M, int64_t width) { return 8 * M * width + quant_act_bytes(M, width); }

struct fused_scratch {
    float *a, *b;
    uint8_t *act;
};

static struct fused_scratch carve(uint8_t *scratch, int64_t M, int64_t width) {
    struct fused_scratch s;
    s.a = (float *)scratch;
    s.b = s.a + M * width;
    s.act = (uint8_t *)(s.b + M * width);
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

/* qkv [M, N] = rope(rmsnorm(x [M, H]) @ w^T + bias): the first `rotated` heads of hd features
 * (queries and keys) rotated by cos and signed sin [M, hd] (RotaryEmbedding.tables' layout:
 * r[i] = x[i] * cos[i] + x[i +- hd/2] * sin[i]). bias may be NULL. */
void fused_norm_qkv(const float *x, int64_t M, int64_t H, const float *norm_w, float eps, int fmt,
                    const uint8_t *w, int64_t N, const float *bias, const float *cos, const float *sin,
                    int64_t rotated, int64_t hd, float *qkv, uint8_t *scratch, int64_t width) {
    const struct fused_scratch s = carve(scratch, M, width);
    rms_norm_rows(x, M, H, norm_w, eps, s.a);
    quant_linear(fmt, w, N, H, s.a, M, qkv, s.act);
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
    quant_linear(o_fmt, o_w, H, A, attn, M, out, s.act);
    for (int64_t i = 0; i < M * H; i++) out[i] = x[i] + out[i];
    rms_norm_rows(out, M, H, norm_w, eps, s.a);
    quant_linear(gu_fmt, gu_w, 2 * I, H, s.a, M, s.b, s.act);
    for (int64_t m = 0; m < M; m++) {
        const float *gate = s.b + m * 2 * I, *up = gate + I;
        float *act = s.a + m * I;
        for (int64_t i = 0; i < I; i++) act[i] = gate[i] / (1.f + exp_f32(-gate[i])) * up[i];
    }
    quant_linear(down_fmt, down_w, H, I, s.a, M, s.b, s.act);
    for (int64_t i = 0; i < M * H; i++) out[i] += s.b[i];
}

/* The pool's parallel-for, for other kernels (engine/paged_attention.c) to share it. */
void quant_parallel_for(int64_t n, int64_t cost, pool_task fn, void *arg) { pool_for(n, cost, fn, arg); }
