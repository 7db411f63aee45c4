/* Paged attention for single-token decodes on the CPU (float32).
 *
 * Reads each sequence's keys and values in place through its block table: no
 * gathered copy, no padding. The work is cut into one item per (sequence, KV
 * head: the query heads that share it read each key and value once), handed to a parallel-for (the quantized kernels' thread pool,
 * models/pool.h, passed in as a function so that one pool serves the whole
 * step). Each item is computed the same way whatever thread runs it and
 * whatever else is in the batch, so results depend neither on the thread count
 * nor on batch composition.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for the softmax's x <= 0, within 2 ulp (Cephes' polynomial): branch-free, so a loop of
 * it vectorizes, where a libm call per score cost a fifth of the kernel. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

typedef void (*task_fn)(void *arg, int64_t begin, int64_t end);
typedef void (*parallel_for_fn)(int64_t n, int64_t cost, task_fn fn, void *arg);

struct decode_args {
    const float *q, *k_cache, *v_cache; /* q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D] */
    const int64_t *tables, *lens;        /* [B, max_blocks]; [B] tokens to attend to */
    float *out;                          /* [B, Hq, D] */
    int Hq, Hkv, D, block_size, max_blocks;
    float scale;
};

/* Ask for the next block's rows of one KV head while this block is read: blocks lie anywhere
 * in the cache, so no hardware prefetcher can guess them (a sixth less time at 600 tokens). */
static inline void prefetch_block(const float *first, int bs, int64_t row, int D) {
    for (int i = 0; i < bs; i++)
        for (int c = 0; c < D; c += 16) __builtin_prefetch(first + i * row + c, 0, 3);
}

/* The G query heads of one KV head of one sequence: softmax(q . K^T * scale) V over its cached
 * tokens, each key and value row read once for the G heads. Inlined with constant sizes for
 * the common shapes, so the output rows stay in registers; scores holds G * len floats. */
static inline __attribute__((always_inline)) void decode_group_d(
    const struct decode_args *a, int64_t b, int g, float *scores, const int D, const int G) {
    const int bs = a->block_size;
    const int64_t len = a->lens[b], row = (int64_t)a->Hkv * D, kv = (int64_t)g * D;
    const int64_t *table = a->tables + b * a->max_blocks;
    const float *q = a->q + (b * a->Hq + (int64_t)g * G) * D;
    float mx[G];
    for (int h = 0; h < G; h++) mx[h] = -INFINITY;
    for (int64_t t = 0, blk = 0; t < len; blk++) {
        const float *kb = a->k_cache + table[blk] * bs * row + kv;
        if (t + bs < len) prefetch_block(a->k_cache + table[blk + 1] * bs * row + kv, bs, row, D);
        for (int i = 0; i < bs && t < len; i++, t++) {
            const float *kh = kb + i * row;
            for (int h = 0; h < G; h++) {
                float s = 0.f;
                for (int d = 0; d < D; d++) s += q[h * D + d] * kh[d];
                s *= a->scale;
                scores[h * len + t] = s;
                mx[h] = s > mx[h] ? s : mx[h];
            }
        }
    }
    float inv[G];
    for (int h = 0; h < G; h++) {
        float *sh = scores + h * len, sum = 0.f;
        const float m = mx[h];
        for (int64_t t = 0; t < len; t++) {
            sh[t] = exp_nonpositive(sh[t] - m);
            sum += sh[t];
        }
        inv[h] = 1.f / sum;
    }
    float acc[G * D];
    for (int i = 0; i < G * D; i++) acc[i] = 0.f;
    for (int64_t t = 0, blk = 0; t < len; blk++) {
        const float *vb = a->v_cache + table[blk] * bs * row + kv;
        if (t + bs < len) prefetch_block(a->v_cache + table[blk + 1] * bs * row + kv, bs, row, D);
        for (int i = 0; i < bs && t < len; i++, t++) {
            const float *vh = vb + i * row;
            for (int h = 0; h < G; h++) {
                const float p = scores[h * len + t] * inv[h];
                for (int d = 0; d < D; d++) acc[h * D + d] += p * vh[d];
            }
        }
    }
    float *out = a->out + (b * a->Hq + (int64_t)g * G) * D;
    for (int i = 0; i < G * D; i++) out[i] = acc[i];
}

static void decode_group(const struct decode_args *a, int64_t b, int g, float *scores) {
    const int G = a->Hq / a->Hkv;
    if (a->D == 64 && G == 3) decode_group_d(a, b, g, scores, 64, 3);
    else if (a->D == 64 && G == 1) decode_group_d(a, b, g, scores, 64, 1);
    else if (a->D == 64 && G == 4) decode_group_d(a, b, g, scores, 64, 4);
    else if (a->D == 128 && G == 4) decode_group_d(a, b, g, scores, 128, 4);
    else if (a->D == 128 && G == 8) decode_group_d(a, b, g, scores, 128, 8);
    else decode_group_d(a, b, g, scores, a->D, G);
}

#define STACK_SCORES 8192

static void decode_items(void *arg, int64_t begin, int64_t end) {
    const struct decode_args *a = arg;
    const int G = a->Hq / a->Hkv;
    float stack[STACK_SCORES], *heap = NULL;
    for (int64_t item = begin; item < end; item++) {
        const int64_t b = item / a->Hkv, need = a->lens[b] * G;
        float *scores = stack;
        if (need > STACK_SCORES) {
            free(heap);
            heap = scores = malloc((size_t)need * sizeof(float));
            if (!scores) abort();
        }
        decode_group(a, b, (int)(item % a->Hkv), scores);
    }
    free(heap);
}

void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                      const int64_t *lens, float *out, int B, int Hq, int Hkv, int D, int block_size,
                      int max_blocks, float scale, int64_t total_tokens, parallel_for_fn parallel_for) {
    struct decode_args a = {q, k_cache, v_cache, tables, lens, out, Hq, Hkv, D, block_size, max_blocks,
                            scale};
    const int64_t items = (int64_t)B * Hkv;
    parallel_for(items, 2 * D * (Hq / Hkv) * (total_tokens / B + 1), decode_items, &a);
}

/* k_cache[slots[t]] = k[t] and v_cache[slots[t]] = v[t] for T tokens of `row` floats (all KV
 * heads), k and v rows `stride` floats apart (views into a fused q/k/v projection). Returns 0,
 * or -1 having written nothing when a slot is outside [0, num_slots). */
int cache_write_f32(const float *k, const float *v, int64_t stride, const int64_t *slots, int64_t T,
                    int64_t row, float *k_cache, float *v_cache, int64_t num_slots) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < T; t++) {
        memcpy(k_cache + slots[t] * row, k + t * stride, (size_t)row * sizeof(float));
        memcpy(v_cache + slots[t] * row, v + t * stride, (size_t)row * sizeof(float));
    }
    return 0;
}
