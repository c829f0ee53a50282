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

#include "bfloat16.h"
#include "decode_step.h"

#define FLOATS_PER_LINE 16
#define PARTITION 64

/* The first key a sequence of `end` keys sees (all, or the last `window`). */
static int64_t visible_from(int64_t end, int64_t window) { return window > 0 && end > window ? end - window : 0; }

/* Eight floats, a vector register on AVX2 and half of one on AVX-512; loads and stores go through
 * memcpy (any alignment, no aliasing question) and compile to single moves. */
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
#define LANES 8

static inline vf8 load8(const float *p) {
    vf8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, vf8 v) { memcpy(p, &v, sizeof v); }

/* Lane j of the result: the sum of a[j]'s lanes, in a fixed tree (the same for every key). */
static inline vf8 sum_lanes8(const vf8 a[LANES]) {
    const vi8 even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
    const vi8 low = {0, 1, 8, 9, 4, 5, 12, 13}, high = {2, 3, 10, 11, 6, 7, 14, 15};
    const vi8 front = {0, 1, 2, 3, 8, 9, 10, 11}, back = {4, 5, 6, 7, 12, 13, 14, 15};
    vf8 pairs[LANES / 2], quads[LANES / 4];
    for (int j = 0; j < LANES / 2; ++j)
        pairs[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], even) + __builtin_shuffle(a[2 * j], a[2 * j + 1], odd);
    for (int j = 0; j < LANES / 4; ++j)
        quads[j] = __builtin_shuffle(pairs[2 * j], pairs[2 * j + 1], low) +
                   __builtin_shuffle(pairs[2 * j], pairs[2 * j + 1], high);
    return __builtin_shuffle(quads[0], quads[1], front) + __builtin_shuffle(quads[0], quads[1], back);
}

/* q . key for eight keys at once (rows[j] + offset: key j's head), eight independent sums. */
static inline vf8 dot8(const float *q, const float *const rows[LANES], int64_t offset, int64_t head_dim) {
    vf8 acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= head_dim; d += LANES) {
        const vf8 qv = load8(q + d);
        for (int j = 0; j < LANES; ++j) acc[j] += qv * load8(rows[j] + offset + d);
    }
    vf8 dots = sum_lanes8(acc);
    for (; d < head_dim; ++d)
        for (int j = 0; j < LANES; ++j) dots[j] += q[d] * rows[j][offset + d];
    return dots;
}

/* out[0, 8 * chunks) = sum over the len rows of p[t] * (rows[t] + offset)[...], the sums held in
 * registers (at most 8 chunks: 64 floats; a constant where this is inlined for whole runs). */
static inline void weighted_sum(const float *p, const float *const *rows, int64_t len, int64_t offset,
                                int chunks, float *out) {
    vf8 acc[LANES] = {0};
    for (int64_t t = 0; t < len; ++t) {
        const float *v = rows[t] + offset;
        for (int c = 0; c < chunks; ++c) acc[c] += p[t] * load8(v + c * LANES);
    }
    for (int c = 0; c < chunks; ++c) store8(out + c * LANES, acc[c]);
}

/* One partition's keys [first, end) of one sequence (at most PARTITION), for heads
 * [first_head, first_head + heads): writes each head's (max score, sum of exp, unnormalized
 * output[head_dim]) to partial. Scores come eight keys at a time (the last group repeats its last
 * key), each head on its own, so a head's arithmetic never depends on which others run with it. */
static void attend_partition(const float *qs, const float *key_cache, const float *value_cache,
                             const int64_t *table, int64_t first, int64_t end, int64_t first_head,
                             int64_t heads, int64_t group, int64_t kv_stride, int64_t head_dim,
                             int64_t block_size, float scale, float softcap, float *scores, float *partial) {
    const int64_t len = end - first;
    const float *key_rows[PARTITION + LANES], *value_rows[PARTITION];
    for (int64_t t = 0; t < len; ++t) {
        const int64_t pos = first + t;
        const int64_t row = table[pos / block_size] * block_size + pos % block_size;
        key_rows[t] = key_cache + row * kv_stride;
        value_rows[t] = value_cache + row * kv_stride;
    }
    for (int64_t t = len; t < PARTITION + LANES; ++t) key_rows[t] = key_rows[len - 1];
    /* A step streams every layer's weights through the caches, so the context comes from memory:
     * ask for it all now, the columns these heads read. */
    const int64_t row_offset = first_head / group * head_dim;
    const int64_t row_width = heads / group * head_dim;
    for (int64_t t = 0; t < len; ++t)
        for (int64_t d = row_offset; d < row_offset + row_width; d += FLOATS_PER_LINE) {
            __builtin_prefetch(key_rows[t] + d);
            __builtin_prefetch(value_rows[t] + d);
        }
    for (int64_t h = 0; h < heads; ++h) {
        const int64_t offset = (first_head + h) / group * head_dim;
        float *row = scores + h * len;
        for (int64_t t = 0; t < len; t += LANES) {
            const vf8 dots = dot8(qs + h * head_dim, key_rows + t, offset, head_dim) * scale;
            for (int64_t j = 0; j < LANES && t + j < len; ++j)
                row[t + j] = softcap > 0.0f ? softcap * tanhf(dots[j] / softcap) : dots[j];
        }
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
        int64_t d = 0;
        for (; d + LANES * LANES <= head_dim; d += LANES * LANES)
            weighted_sum(row, value_rows, len, offset + d, LANES, head + 2 + d);
        if (d + LANES <= head_dim) {
            weighted_sum(row, value_rows, len, offset + d, (int)((head_dim - d) / LANES), head + 2 + d);
            d += (head_dim - d) / LANES * LANES;
        }
        for (; d < head_dim; ++d) {
            float a = 0.0f;
            for (int64_t t = 0; t < len; ++t) a += row[t] * value_rows[t][offset + d];
            head[2 + d] = a;
        }
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

/* A layer's attention for a step of decodes straight from its q/k/v projection's output
 * ([num_seqs, q | k | v], rows qkv_stride elements apart): RoPE on q and k (in place where they
 * are float32, else on a float32 copy), the new keys and values stored, and the attention above,
 * into out ([num_seqs, num_heads * head_dim]). One call where a layer made four, each a share of
 * a one-stream step. */
int decode_layer_attention(const struct decode_step *step, const struct decode_layer *layer, void *qkv,
                           int64_t qkv_stride, const float *cos, const float *sin, int64_t rotary_dim,
                           int64_t table_stride, float *key_cache, float *value_cache, void *out) {
    const int64_t num_seqs = step->num_seqs, head_dim = layer->head_dim;
    const int64_t q_size = layer->num_heads * head_dim, kv_size = layer->num_kv_heads * head_dim;
    const int64_t width = q_size + 2 * kv_size;
    float *rows = qkv, *scratch = NULL, *result = out;
    int64_t stride = qkv_stride;
    if (layer->qkv_bf16 || layer->out_bf16) {
        scratch = malloc(sizeof(float) * (size_t)(num_seqs * (width + q_size)));
        if (scratch == NULL) return 1;
        if (layer->out_bf16) result = scratch + num_seqs * width;
    }
    if (layer->qkv_bf16) {
        for (int64_t s = 0; s < num_seqs; ++s)
            read_floats((const uint16_t *)qkv + s * qkv_stride, width, 1, scratch + s * width);
        rows = scratch;
        stride = width;
    }
    layer->rotary(rows, rows + q_size, cos, sin, num_seqs, layer->num_heads, layer->num_kv_heads, stride, stride,
                  head_dim, rotary_dim, table_stride);
    const int status = paged_decode_attention(
        rows, rows + q_size, rows + q_size + kv_size, step->slots, key_cache, value_cache, step->block_tables,
        step->context_lens, result, num_seqs, layer->num_heads, stride, stride, stride, layer->num_kv_heads,
        head_dim, step->block_size, step->max_blocks, layer->window, layer->scale, layer->softcap);
    if (status == 0 && layer->out_bf16) write_floats(result, num_seqs * q_size, 1, out);
    free(scratch);
    return status;
}
