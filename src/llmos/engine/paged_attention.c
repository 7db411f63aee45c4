/* Paged attention for single-token decodes on the CPU (float32 queries; a float32 or float16 cache).
 *
 * Reads each sequence's keys and values in place through its block table: no
 * gathered copy, no padding. The work is cut into one item per (piece of SPLIT
 * tokens of a sequence's context, KV head: the query heads that share it read
 * each key and value once), handed to a parallel-for (the quantized kernels'
 * thread pool, models/pool.h, passed in as a function so that one pool serves
 * the whole step); a sequence of several pieces has them merged by their
 * softmax maxima and sums afterwards. Each item is computed the same way
 * whatever thread runs it, and the pieces depend only on the sequence's own
 * length, so results depend neither on the thread count nor on batch
 * composition.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../models/vexp.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef void (*task_fn)(void *arg, int64_t begin, int64_t end);
typedef void (*parallel_for_fn)(int64_t n, int64_t cost, task_fn fn, void *arg);

/* The cache's elements: float32, or float16 (half the memory traffic; converted on load). */
typedef _Float16 half;

struct decode_args {
    const float *q;                      /* [B, Hq, D] */
    const void *k_cache, *v_cache;       /* [num_blocks, block_size, Hkv, D] of float or half */
    const int64_t *tables, *lens;        /* [B, max_blocks]; [B] tokens to attend to */
    float *out;                          /* [B, Hq, D] */
    int Hq, Hkv, D, block_size, max_blocks, f16;
    float scale;
};

/* Ask for the next block's rows of one KV head while this block is read: blocks lie anywhere
 * in the cache, so no hardware prefetcher can guess them (a sixth less time at 600 tokens). */
static inline void prefetch_block(const void *cache, int64_t first, int bs, int64_t row, int D, int F16) {
    const int size = F16 ? 2 : 4;
    for (int i = 0; i < bs; i++)
        for (int c = 0; c < D * size; c += 64)
            __builtin_prefetch((const char *)cache + (first + i * row) * size + c, 0, 3);
}

/* The D elements of a cache from element `first`, as floats: in place for a float32 cache,
 * converted into buf (16 at a time where AVX-512 is) for a float16 one. */
static inline const float *cache_row(const void *cache, int64_t first, int D, int F16, float *buf) {
    if (!F16) return (const float *)cache + first;
    const half *src = (const half *)cache + first;
    int d = 0;
#if defined(__AVX512F__)
    for (; d + 16 <= D; d += 16) _mm512_storeu_ps(buf + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + d))));
#endif
    for (; d < D; d++) buf[d] = (float)src[d];
    return buf;
}

/* A sequence's context is cut into pieces of SPLIT tokens, each its own work item (so one long
 * sequence keeps every thread busy: flash-decoding), merged afterwards. The cut depends only on
 * the sequence's own length, so its result does not depend on the batch around it. */
#define SPLIT 256

/* The G query heads of one KV head of one sequence over tokens [t0, t1) of its context:
 * scores q . K^T * scale, their maximum m and p = exp(score - m). With `out` (the whole context
 * in one piece) it writes softmax(scores) V there; otherwise the piece's m, sum(p) and the
 * unnormalized p V to part [G * (D + 2)]. Inlined with constant sizes for the common shapes, so
 * the output rows stay in registers; each key and value row is read once for the G heads. */
static inline __attribute__((always_inline)) void decode_piece_d(
    const struct decode_args *a, int64_t b, int g, int64_t t0, int64_t t1, float *out, float *part,
    const int D, const int G, const int F16) {
    const int bs = a->block_size;
    const int64_t n = t1 - t0, row = (int64_t)a->Hkv * D, kv = (int64_t)g * D;
    const int64_t *table = a->tables + b * a->max_blocks;
    const float *q = a->q + (b * a->Hq + (int64_t)g * G) * D;
    float scores[G * SPLIT], mx[G];
    for (int h = 0; h < G; h++) mx[h] = -INFINITY;
    for (int64_t t = t0; t < t1;) {
        const int64_t blk = t / bs;
        const int64_t kb = table[blk] * bs * row + kv;
        if ((blk + 1) * bs < t1) prefetch_block(a->k_cache, table[blk + 1] * bs * row + kv, bs, row, D, F16);
        for (int i = (int)(t % bs); i < bs && t < t1; i++, t++) {
            float buf[D];
            const float *kh = cache_row(a->k_cache, kb + i * row, D, F16, buf);
            for (int h = 0; h < G; h++) {
                float s = 0.f;
                for (int d = 0; d < D; d++) s += q[h * D + d] * kh[d];
                s *= a->scale;
                scores[h * SPLIT + (t - t0)] = s;
                mx[h] = s > mx[h] ? s : mx[h];
            }
        }
    }
    float sums[G], inv[G];
    for (int h = 0; h < G; h++) {
        float *sh = scores + h * SPLIT, sum = 0.f;
        const float m = mx[h];
        for (int64_t t = 0; t < n; t++) {
            sh[t] = exp_f32(sh[t] - m);
            sum += sh[t];
        }
        sums[h] = sum;
        inv[h] = out ? 1.f / sum : 1.f;
    }
    float acc[G * D];
    for (int i = 0; i < G * D; i++) acc[i] = 0.f;
    for (int64_t t = t0; t < t1;) {
        const int64_t blk = t / bs;
        const int64_t vb = table[blk] * bs * row + kv;
        if ((blk + 1) * bs < t1) prefetch_block(a->v_cache, table[blk + 1] * bs * row + kv, bs, row, D, F16);
        for (int i = (int)(t % bs); i < bs && t < t1; i++, t++) {
            float buf[D];
            const float *vh = cache_row(a->v_cache, vb + i * row, D, F16, buf);
            for (int h = 0; h < G; h++) {
                const float p = scores[h * SPLIT + (t - t0)] * inv[h];
                for (int d = 0; d < D; d++) acc[h * D + d] += p * vh[d];
            }
        }
    }
    if (out) {
        for (int i = 0; i < G * D; i++) out[i] = acc[i];
        return;
    }
    for (int h = 0; h < G; h++) {
        part[h * (D + 2)] = mx[h];
        part[h * (D + 2) + 1] = sums[h];
        for (int d = 0; d < D; d++) part[h * (D + 2) + 2 + d] = acc[h * D + d];
    }
}

#if defined(__AVX512F__)
/* exp_f32 on 16 lanes, for x <= 0 (scores less their maximum). */
static inline __m512 exp_nonpositive16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

static inline __m512 load16(const void *cache, int64_t first, int F16) {
    return F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const half *)cache + first)))
               : _mm512_loadu_ps((const float *)cache + first);
}

/* decode_piece_d's computation in AVX-512 registers, for D a multiple of 16 (at most 128) and
 * G at most 8: the queries and the G output rows stay in registers, each key and value row is
 * loaded (and converted) once. */
static inline __attribute__((always_inline)) void decode_piece_v(
    const struct decode_args *a, int64_t b, int g, int64_t t0, int64_t t1, float *out, float *part,
    const int D, const int G, const int F16) {
    const int bs = a->block_size, V = D / 16;
    const int64_t n = t1 - t0, row = (int64_t)a->Hkv * D, kv = (int64_t)g * D;
    const int64_t *table = a->tables + b * a->max_blocks;
    const float *q = a->q + (b * a->Hq + (int64_t)g * G) * D;
    __m512 qv[8][8];
    for (int h = 0; h < G; h++)
        for (int j = 0; j < V; j++) qv[h][j] = _mm512_loadu_ps(q + h * D + 16 * j);
    float scores[8 * SPLIT] __attribute__((aligned(64))), mx[8];
    for (int h = 0; h < G; h++) mx[h] = -INFINITY;
    for (int64_t t = t0; t < t1;) {
        const int64_t blk = t / bs, base = table[blk] * bs * row + kv;
        if ((blk + 1) * bs < t1) prefetch_block(a->k_cache, table[blk + 1] * bs * row + kv, bs, row, D, F16);
        for (int i = (int)(t % bs); i < bs && t < t1; i++, t++) {
            __m512 k[8];
            for (int j = 0; j < V; j++) k[j] = load16(a->k_cache, base + i * row + 16 * j, F16);
            for (int h = 0; h < G; h++) {
                __m512 acc = _mm512_mul_ps(qv[h][0], k[0]);
                for (int j = 1; j < V; j++) acc = _mm512_fmadd_ps(qv[h][j], k[j], acc);
                const float sc = _mm512_reduce_add_ps(acc) * a->scale;
                scores[h * SPLIT + (t - t0)] = sc;
                mx[h] = sc > mx[h] ? sc : mx[h];
            }
        }
    }
    float sums[8], inv[8];
    for (int h = 0; h < G; h++) {
        float *sh = scores + h * SPLIT;
        const __m512 m = _mm512_set1_ps(mx[h]);
        __m512 total = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t += 16) {
            const __mmask16 live = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
            const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sh + t), m));
            _mm512_mask_storeu_ps(sh + t, live, e);
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
        }
        sums[h] = _mm512_reduce_add_ps(total);
        inv[h] = out ? 1.f / sums[h] : 1.f;
    }
    __m512 acc[8][8];
    for (int h = 0; h < G; h++)
        for (int j = 0; j < V; j++) acc[h][j] = _mm512_setzero_ps();
    for (int64_t t = t0; t < t1;) {
        const int64_t blk = t / bs, base = table[blk] * bs * row + kv;
        if ((blk + 1) * bs < t1) prefetch_block(a->v_cache, table[blk + 1] * bs * row + kv, bs, row, D, F16);
        for (int i = (int)(t % bs); i < bs && t < t1; i++, t++) {
            __m512 v[8];
            for (int j = 0; j < V; j++) v[j] = load16(a->v_cache, base + i * row + 16 * j, F16);
            for (int h = 0; h < G; h++) {
                const __m512 p = _mm512_set1_ps(scores[h * SPLIT + (t - t0)] * inv[h]);
                for (int j = 0; j < V; j++) acc[h][j] = _mm512_fmadd_ps(p, v[j], acc[h][j]);
            }
        }
    }
    for (int h = 0; h < G; h++) {
        float *dst = out ? out + h * D : part + h * (D + 2) + 2;
        for (int j = 0; j < V; j++) _mm512_storeu_ps(dst + 16 * j, acc[h][j]);
        if (!out) {
            part[h * (D + 2)] = mx[h];
            part[h * (D + 2) + 1] = sums[h];
        }
    }
}
#define DECODE_PIECE_FAST decode_piece_v
#else
#define DECODE_PIECE_FAST decode_piece_d
#endif

static void decode_piece(const struct decode_args *a, int64_t b, int g, int64_t t0, int64_t t1, float *out,
                         float *part) {
    const int G = a->Hq / a->Hkv;
#define SHAPES(F)                                                                                  \
    if (a->D == 64 && G == 3) DECODE_PIECE_FAST(a, b, g, t0, t1, out, part, 64, 3, F);             \
    else if (a->D == 64 && G == 1) DECODE_PIECE_FAST(a, b, g, t0, t1, out, part, 64, 1, F);        \
    else if (a->D == 64 && G == 4) DECODE_PIECE_FAST(a, b, g, t0, t1, out, part, 64, 4, F);        \
    else if (a->D == 128 && G == 4) DECODE_PIECE_FAST(a, b, g, t0, t1, out, part, 128, 4, F);      \
    else if (a->D == 128 && G == 8) DECODE_PIECE_FAST(a, b, g, t0, t1, out, part, 128, 8, F);      \
    else decode_piece_d(a, b, g, t0, t1, out, part, a->D, G, F)
    if (a->f16) {
        SHAPES(1);
    } else {
        SHAPES(0);
    }
#undef SHAPES
}

struct decode_job {
    const struct decode_args *a;
    const int64_t *first; /* [B + 1]: sequence b's pieces are first[b] .. first[b + 1] - 1 */
    float *parts;         /* [pieces * Hkv][G * (D + 2)] for sequences of more than one piece */
};

static int64_t pieces_of(int64_t len) { return len > SPLIT ? (len + SPLIT - 1) / SPLIT : 1; }

/* Items: (piece, KV head), sequence by sequence. */
static void decode_items(void *arg, int64_t begin, int64_t end) {
    const struct decode_job *j = arg;
    const struct decode_args *a = j->a;
    const int G = a->Hq / a->Hkv;
    int64_t b = 0;
    for (int64_t item = begin; item < end; item++) {
        const int64_t piece = item / a->Hkv;
        const int g = (int)(item % a->Hkv);
        while (j->first[b + 1] <= piece) b++;
        const int64_t s = piece - j->first[b], len = a->lens[b], t0 = s * SPLIT;
        const int64_t t1 = t0 + SPLIT < len ? t0 + SPLIT : len;
        if (j->first[b + 1] - j->first[b] == 1)
            decode_piece(a, b, g, t0, t1, a->out + (b * a->Hq + (int64_t)g * G) * a->D, NULL);
        else
            decode_piece(a, b, g, t0, t1, NULL, j->parts + item * G * (a->D + 2));
    }
}

/* The pieces of (sequence, KV head) items merged: out = sum_s w_s acc_s / sum_s w_s sum_s with
 * w_s = exp(m_s - max m). */
static void merge_items(void *arg, int64_t begin, int64_t end) {
    const struct decode_job *j = arg;
    const struct decode_args *a = j->a;
    const int G = a->Hq / a->Hkv, D = a->D, stride = G * (D + 2);
    for (int64_t item = begin; item < end; item++) {
        const int64_t b = item / a->Hkv;
        const int g = (int)(item % a->Hkv);
        const int64_t p0 = j->first[b], p1 = j->first[b + 1];
        if (p1 - p0 == 1) continue;
        for (int h = 0; h < G; h++) {
            float top = -INFINITY, total = 0.f;
            for (int64_t p = p0; p < p1; p++) {
                const float m = j->parts[(p * a->Hkv + g) * stride + h * (D + 2)];
                top = m > top ? m : top;
            }
            float *o = a->out + (b * a->Hq + (int64_t)g * G + h) * D;
            for (int d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t p = p0; p < p1; p++) {
                const float *part = j->parts + (p * a->Hkv + g) * stride + h * (D + 2);
                const float w = exp_f32(part[0] - top);
                total += w * part[1];
                for (int d = 0; d < D; d++) o[d] += w * part[2 + d];
            }
            for (int d = 0; d < D; d++) o[d] /= total;
        }
    }
}

/* Decode attention for B sequences; the caches hold float16 when f16, else float32. */
void paged_decode(const float *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                  const int64_t *lens, float *out, int B, int Hq, int Hkv, int D, int block_size,
                  int max_blocks, int f16, float scale, int64_t total_tokens, parallel_for_fn parallel_for) {
    struct decode_args a = {q, k_cache, v_cache, tables, lens, out, Hq, Hkv, D, block_size, max_blocks,
                            f16, scale};
    int64_t *first = malloc(((size_t)B + 1) * sizeof(int64_t));
    if (!first) abort();
    first[0] = 0;
    for (int b = 0; b < B; b++) first[b + 1] = first[b] + pieces_of(lens[b]);
    const int64_t pieces = first[B];
    float *parts = NULL;
    if (pieces > B) {
        parts = malloc((size_t)(pieces * Hkv) * (size_t)(Hq / Hkv) * (size_t)(D + 2) * sizeof(float));
        if (!parts) abort();
    }
    struct decode_job j = {&a, first, parts};
    const int64_t per_piece = total_tokens / pieces + 1;
    parallel_for(pieces * Hkv, 2 * D * (Hq / Hkv) * per_piece, decode_items, &j);
    if (parts) parallel_for((int64_t)B * Hkv, (pieces / B) * D * (Hq / Hkv), merge_items, &j);
    free(parts);
    free(first);
}

/* k_cache[slots[t]] = k[t] and v_cache[slots[t]] = v[t] for T tokens of `row` floats (all KV
 * heads), k and v rows `stride` floats apart (views into a fused q/k/v projection), the caches
 * float16 when f16 (rounded to nearest), else float32. Returns 0, or -1 having written nothing
 * when a slot is outside [0, num_slots). */
int cache_write(const float *k, const float *v, int64_t stride, const int64_t *slots, int64_t T,
                int64_t row, void *k_cache, void *v_cache, int64_t num_slots, int f16) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < T; t++) {
        if (f16) {
            half *kc = (half *)k_cache + slots[t] * row, *vc = (half *)v_cache + slots[t] * row;
            int64_t i = 0;
#if defined(__AVX512F__)
            for (; i + 16 <= row; i += 16) {
                const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                _mm256_storeu_si256((__m256i *)(kc + i), _mm512_cvtps_ph(_mm512_loadu_ps(k + t * stride + i), round));
                _mm256_storeu_si256((__m256i *)(vc + i), _mm512_cvtps_ph(_mm512_loadu_ps(v + t * stride + i), round));
            }
#endif
            for (; i < row; i++) {
                kc[i] = (half)k[t * stride + i];
                vc[i] = (half)v[t * stride + i];
            }
        } else {
            memcpy((float *)k_cache + slots[t] * row, k + t * stride, (size_t)row * sizeof(float));
            memcpy((float *)v_cache + slots[t] * row, v + t * stride, (size_t)row * sizeof(float));
        }
    }
    return 0;
}
