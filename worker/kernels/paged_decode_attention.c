/* Attention of one new token per sequence over its paged K/V cache, read in place.
 *
 * Gathering every sequence's context into a padded tensor before SDPA copies the whole KV cache
 * twice per layer; this reads each cached key and value once, straight from its block.
 * Each sequence's new key and value are stored into the cache first (at slots[s]), so a step
 * spends no separate copy on them.
 * Layouts (float32, row-major):
 *   q:             [num_seqs, num_heads, head_dim], sequences q_stride apart (a view of the
 *                  q/k/v projection's output need not be copied)
 *   k_new, v_new:  [num_seqs, num_kv_heads * head_dim], rows k_stride and v_stride apart (views too)
 *   slots:         [num_seqs] int64, the cache slot of each sequence's new key and value
 *   out:           [num_seqs, num_heads, head_dim]
 *   key/value:     [num_slots, num_kv_heads, head_dim], slot = block_id * block_size + offset
 *   block_tables:  [num_seqs, max_blocks] int64
 *   context_lens:  [num_seqs] int64, keys [0, context_len) are visible, or only the last `window`
 *                  of them when window > 0 (a sliding-window layer)
 * Scores are scaled by `scale` and, when softcap > 0, soft-capped as softcap * tanh(score / softcap).
 * Built with -ffast-math: sums are reassociated and exp is glibc's vector one, so results differ
 * from a scalar loop in rounding only (nothing here is infinite: a query always sees its own key,
 * so the running maximum starts from a real score). Prefetches may point past a block or the
 * cache; they are hints and never fault.
 * Sequences and KV heads are spread over OpenMP threads; inside torch's process the soname libgomp.so.1
 * resolves to torch's own runtime, so the kernel shares torch's thread pool instead of fighting it.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FLOATS_PER_LINE 16
#define PREFETCH_ROWS 8

int paged_decode_attention(const float *q, const float *k_new, const float *v_new, const int64_t *slots,
                           float *key_cache, float *value_cache, const int64_t *block_tables,
                           const int64_t *context_lens, float *out, int64_t num_seqs, int64_t num_heads,
                           int64_t q_stride, int64_t k_stride, int64_t v_stride, int64_t num_kv_heads,
                           int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t window,
                           float scale, float softcap) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t kv_stride = num_kv_heads * head_dim;
    for (int64_t s = 0; s < num_seqs; ++s) {
        memcpy(key_cache + slots[s] * kv_stride, k_new + s * k_stride, sizeof(float) * (size_t)kv_stride);
        memcpy(value_cache + slots[s] * kv_stride, v_new + s * v_stride, sizeof(float) * (size_t)kv_stride);
    }
    int64_t max_len = 0;
    for (int64_t s = 0; s < num_seqs; ++s)
        if (context_lens[s] > max_len) max_len = context_lens[s];
    /* An item is a sequence's heads, or, with fewer sequences than threads (one stream), the query
     * heads of one KV head, so that every thread has work; each head's sums run in the same order
     * whichever way the work is split. */
    const int64_t parts = num_seqs < omp_get_max_threads() ? num_kv_heads : 1;
    const int64_t part_heads = num_heads / parts;
    const int64_t part_width = part_heads / group * head_dim; /* of a K/V row, read by one item */
    int failed = 0;
#pragma omp parallel
    {
    /* scores: [part_heads][max_len], then the output accumulator [part_heads][head_dim] */
    float *scores = malloc(sizeof(float) * (size_t)(part_heads * (max_len + head_dim)));
    float *acc = scores + part_heads * max_len;
    if (scores == NULL) {
#pragma omp atomic write
        failed = 1;
    }
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < num_seqs * parts; ++item) {
        if (scores == NULL) continue;
        const int64_t s = item / parts;
        const int64_t first_head = item % parts * part_heads;
        const int64_t end = context_lens[s];
        const int64_t first = window > 0 && end > window ? end - window : 0;
        const int64_t len = end - first;
        const int64_t *table = block_tables + s * max_blocks;
        const float *qs = q + s * q_stride + first_head * head_dim;
        const int64_t part_offset = first_head / group * head_dim;
        /* Pass 1: every head's score against each visible key, a block's run at a time. */
        for (int64_t pos = first; pos < end;) {
            const int64_t offset = pos % block_size;
            const int64_t n = end - pos < block_size - offset ? end - pos : block_size - offset;
            const float *keys = key_cache + (table[pos / block_size] * block_size + offset) * kv_stride;
            const float *values = value_cache + (table[pos / block_size] * block_size + offset) * kv_stride;
            for (int64_t t = 0; t < n; ++t) {
                const float *key_row = keys + t * kv_stride;
                /* A step streams every layer's weights through the caches, so the context comes
                 * from memory: ask early for the keys a few rows on and for this row's values. */
                for (int64_t d = part_offset; d < part_offset + part_width; d += FLOATS_PER_LINE) {
                    __builtin_prefetch(key_row + PREFETCH_ROWS * kv_stride + d);
                    __builtin_prefetch(values + t * kv_stride + d);
                }
                for (int64_t h = 0; h < part_heads; ++h) {
                    const float *k = key_row + ((first_head + h) / group) * head_dim;
                    const float *qh = qs + h * head_dim;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * k[d];
                    dot *= scale;
                    if (softcap > 0.0f) dot = softcap * tanhf(dot / softcap);
                    scores[h * len + pos - first + t] = dot;
                }
            }
            pos += n;
        }
        /* Softmax per head. */
        for (int64_t h = 0; h < part_heads; ++h) {
            float *row = scores + h * len;
            float max = row[0]; /* every query sees its own key: len >= 1 */
            for (int64_t t = 1; t < len; ++t) max = row[t] > max ? row[t] : max;
            float sum = 0.0f;
            for (int64_t t = 0; t < len; ++t) {
                row[t] = expf(row[t] - max);
                sum += row[t];
            }
            const float inv = 1.0f / sum;
            for (int64_t t = 0; t < len; ++t) row[t] *= inv;
        }
        /* Pass 2: weighted sum of values, the same runs. */
        for (int64_t i = 0; i < part_heads * head_dim; ++i) acc[i] = 0.0f;
        for (int64_t pos = first; pos < end;) {
            const int64_t offset = pos % block_size;
            const int64_t n = end - pos < block_size - offset ? end - pos : block_size - offset;
            const float *values = value_cache + (table[pos / block_size] * block_size + offset) * kv_stride;
            for (int64_t t = 0; t < n; ++t) {
                const float *value_row = values + t * kv_stride;
                for (int64_t h = 0; h < part_heads; ++h) {
                    const float *v = value_row + ((first_head + h) / group) * head_dim;
                    const float p = scores[h * len + pos - first + t];
                    float *a = acc + h * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
                }
            }
            pos += n;
        }
        float *o = out + (s * num_heads + first_head) * head_dim;
        for (int64_t i = 0; i < part_heads * head_dim; ++i) o[i] = acc[i];
    }
    free(scores);
    }
    return failed;
}
