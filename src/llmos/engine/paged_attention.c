/* Paged attention for single-token decodes on the CPU (float32).
 *
 * Reads each sequence's keys and values once, in place, through its block
 * table: no gathered copy, no padding, each token's row of all KV heads read
 * contiguously. One call handles rows [row_begin, row_end) of the batch, so
 * the caller can split a batch across threads. Each sequence is computed the
 * same way whatever else is in the batch, so results do not depend on batch
 * composition.
 */
#include <math.h>
#include <stdint.h>

void paged_decode_f32(
    const float *q,            /* [B, Hq, D] */
    const float *k_cache,      /* [num_blocks, block_size, Hkv, D] */
    const float *v_cache,      /* same */
    const int64_t *tables,     /* [B, max_blocks] */
    const int64_t *lens,       /* [B] tokens to attend to */
    float *out,                /* [B, Hq, D] */
    int row_begin, int row_end, int Hq, int Hkv, int D, int block_size, int max_blocks,
    float scale, float *scores /* [Hq * max_len] scratch */)
{
    const int G = Hq / Hkv;
    const int64_t row = (int64_t)Hkv * D;
    for (int b = row_begin; b < row_end; b++) {
        const int64_t len = lens[b];
        const int64_t *table = tables + (int64_t)b * max_blocks;
        const float *qb = q + (int64_t)b * Hq * D;
        float *ob = out + (int64_t)b * Hq * D;
        /* scores[hq][t] = q[hq] . k[t][hq / G] */
        for (int64_t t = 0; t < len; t++) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *kr = k_cache + slot * row;
            for (int hq = 0; hq < Hq; hq++) {
                const float *qh = qb + (int64_t)hq * D;
                const float *kh = kr + (int64_t)(hq / G) * D;
                float s = 0.f;
                for (int d = 0; d < D; d++) s += qh[d] * kh[d];
                scores[(int64_t)hq * len + t] = s * scale;
            }
        }
        for (int hq = 0; hq < Hq; hq++) {
            float *sh = scores + (int64_t)hq * len;
            float m = -INFINITY, sum = 0.f;
            for (int64_t t = 0; t < len; t++) m = sh[t] > m ? sh[t] : m;
            for (int64_t t = 0; t < len; t++) {
                sh[t] = expf(sh[t] - m);
                sum += sh[t];
            }
            const float inv = 1.f / sum;
            for (int64_t t = 0; t < len; t++) sh[t] *= inv;
        }
        for (int i = 0; i < Hq * D; i++) ob[i] = 0.f;
        for (int64_t t = 0; t < len; t++) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *vr = v_cache + slot * row;
            for (int hq = 0; hq < Hq; hq++) {
                const float p = scores[(int64_t)hq * len + t];
                const float *vh = vr + (int64_t)(hq / G) * D;
                float *oh = ob + (int64_t)hq * D;
                for (int d = 0; d < D; d++) oh[d] += p * vh[d];
            }
        }
    }
}
