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
 * from a scalar loop in rounding only (nothing here is infinite: every partition holds at least one
 * key, so its maximum is a real score). Prefetches may point past a block or the
 * cache; they are hints and never fault.
 * A sequence's keys are cut into partitions of PARTITION keys (counted from its first visible
 * key), each attended on its own (its maximum score, its sum of exponentials, its weighted sum of
 * values, per head), then merged in order: flash-decoding's split. Partitions of sequences are
 * spread over OpenMP threads, so one long sequence keeps every thread busy, each reading whole
 * K/V rows (all heads: whole cache lines). The cut depends on a sequence's own length only, so
 * its result never depends on the batch or the thread count. With fewer partitions than threads
 * a partition's heads are split by KV head too, which changes no sum.
 * Inside torch's process the soname libgomp.so.1 resolves to torch's own runtime, so the kernel
 * shares torch's thread pool instead of fighting it.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FLOATS_PER_LINE 16
#define PREFETCH_ROWS 8
#define PARTITION 64

/* The first key a sequence of `end` keys sees (all, or the last `window`). */
static int64_t visible_from(int64_t end, int64_t window) { return window > 0 && end > window ? end - window : 0; }

/* One partition's keys [first, end) of one sequence, for heads [first_head, first_head + heads):
 * writes each head's (max score, sum of exp, unnormalized output[head_dim]) to partial. */
static void attend_partition(const float *qs, const float *key_cache, const float *value_cache,
                             const int64_t *table, int64_t first, int64_t end, int64_t first_head,
                             int64_t heads, int64_t group, int64_t kv_stride, int64_t head_dim,
                             int64_t block_size, float scale, float softcap, float *scores, float *partial) {
    const int64_t len = end - first;
    const int64_t row_offset = first_head / group * head_dim; /* of the first K/V column read */
    const int64_t row_width = heads / group * head_dim;
    /* Scores of every head against each key, a block's run at a time. */
    for (int64_t pos = first; pos < end;) {
        const int64_t offset = pos % block_size;
        const int64_t n = end - pos < block_size - offset ? end - pos : block_size - offset;
        const int64_t row0 = table[pos / block_size] * block_size + offset;
        const float *keys = key_cache + row0 * kv_stride;
        const float *values = value_cache + row0 * kv_stride;
        for (int64_t t = 0; t < n; ++t) {
            const float *key_row = keys + t * kv_stride;
            /* A step streams every layer's weights through the caches, so the context comes from
             * memory: ask early for the keys a few rows on and for this row's values. */
            for (int64_t d = row_offset; d < row_offset + row_width; d += FLOATS_PER_LINE) {
                __builtin_prefetch(key_row + PREFETCH_ROWS * kv_stride + d);
                __builtin_prefetch(values + t * kv_stride + d);
            }
            for (int64_t h = 0; h < heads; ++h) {
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
    for (int64_t h = 0; h < heads; ++h) {
        float *row = scores + h * len;
        float max = row[0];
        for (int64_t t = 1; t < len; ++t) max = row[t] > max ? row[t] : max;
        float sum = 0.0f;
        for (int64_t t = 0; t < len; ++t) {
            row[t] = expf(row[t] - max);
            sum += row[t];
        }
        float *head = partial + h * (head_dim + 2);
        head[0] = max;
        head[1] = sum;
        for (int64_t d = 0; d < head_dim; ++d) head[2 + d] = 0.0f;
    }
    /* Weighted sum of values, the same runs. */
    for (int64_t pos = first; pos < end;) {
        const int64_t offset = pos % block_size;
        const int64_t n = end - pos < block_size - offset ? end - pos : block_size - offset;
        const float *values = value_cache + (table[pos / block_size] * block_size + offset) * kv_stride;
        for (int64_t t = 0; t < n; ++t) {
            const float *value_row = values + t * kv_stride;
            for (int64_t h = 0; h < heads; ++h) {
                const float *v = value_row + ((first_head + h) / group) * head_dim;
                const float p = scores[h * len + pos - first + t];
                float *a = partial + h * (head_dim + 2) + 2;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
            }
        }
        pos += n;
    }
}

int paged_decode_attention(const float *q, const float *k_new, const float *v_new, const int64_t *slots,
                           float *key_cache, float *value_cache, const int64_t *block_tables,
                           const int64_t *context_lens, float *out, int64_t num_seqs, int64_t num_heads,
                           int64_t q_stride, int64_t k_stride, int64_t v_stride, int64_t num_kv_heads,
                           int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t window,
                           float scale, float softcap) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t kv_stride = num_kv_heads * head_dim;
    const int64_t head_floats = head_dim + 2; /* a partial: max, sum, output */
    for (int64_t s = 0; s < num_seqs; ++s) {
        memcpy(key_cache + slots[s] * kv_stride, k_new + s * k_stride, sizeof(float) * (size_t)kv_stride);
        memcpy(value_cache + slots[s] * kv_stride, v_new + s * v_stride, sizeof(float) * (size_t)kv_stride);
    }
    /* first_partition[s]: index of sequence s's first partition among all; [num_seqs]: the total. */
    int64_t *first_partition = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1));
    if (first_partition == NULL) return 1;
    first_partition[0] = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t len = context_lens[s] - visible_from(context_lens[s], window);
        first_partition[s + 1] = first_partition[s] + (len + PARTITION - 1) / PARTITION;
    }
    const int64_t num_partitions = first_partition[num_seqs];
    const int64_t parts = num_partitions < omp_get_max_threads() ? num_kv_heads : 1;
    const int64_t part_heads = num_heads / parts;
    float *partials = malloc(sizeof(float) * (size_t)(num_partitions * num_heads * head_floats));
    if (partials == NULL) {
        free(first_partition);
        return 1;
    }
    int failed = 0;
#pragma omp parallel
    {
    float *scores = malloc(sizeof(float) * (size_t)(part_heads * PARTITION));
    if (scores == NULL) {
#pragma omp atomic write
        failed = 1;
    }
    int64_t s = 0; /* the sequence of the item last taken: monotonic, a thread's items only increase */
#pragma omp for schedule(monotonic : dynamic)
    for (int64_t item = 0; item < num_partitions * parts; ++item) {
        if (scores == NULL) continue;
        const int64_t partition = item / parts;
        while (first_partition[s + 1] <= partition) ++s;
        const int64_t first_head = item % parts * part_heads;
        const int64_t from = visible_from(context_lens[s], window) + (partition - first_partition[s]) * PARTITION;
        const int64_t to = from + PARTITION < context_lens[s] ? from + PARTITION : context_lens[s];
        attend_partition(q + s * q_stride + first_head * head_dim, key_cache, value_cache,
                         block_tables + s * max_blocks, from, to, first_head, part_heads, group, kv_stride,
                         head_dim, block_size, scale, softcap, scores,
                         partials + (partition * num_heads + first_head) * head_floats);
    }
    free(scores);
    if (!failed) { /* read after the loop's barrier: every thread sees the same */
        /* Merge each head's partitions in order: rescale to the largest maximum and normalize. */
#pragma omp for schedule(static)
        for (int64_t item = 0; item < num_seqs * num_heads; ++item) {
            const int64_t seq = item / num_heads, h = item % num_heads;
            const float *first = partials + (first_partition[seq] * num_heads + h) * head_floats;
            const int64_t count = first_partition[seq + 1] - first_partition[seq];
            const int64_t step = num_heads * head_floats;
            float max = first[0];
            for (int64_t p = 1; p < count; ++p) max = first[p * step] > max ? first[p * step] : max;
            float *o = out + (seq * num_heads + h) * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) o[d] = 0.0f;
            float sum = 0.0f;
            for (int64_t p = 0; p < count; ++p) {
                const float *partial = first + p * step;
                const float weight = expf(partial[0] - max);
                sum += weight * partial[1];
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) o[d] += weight * partial[2 + d];
            }
            const float inv = 1.0f / sum;
            for (int64_t d = 0; d < head_dim; ++d) o[d] *= inv;
        }
    }
    }
    free(partials);
    free(first_partition);
    return failed;
}
