/* Attention of a step's prompt chunks over the paged K/V cache, read in place, every chunk of the
 * step in one call.
 *
 * SDPA, one call a chunk, computes every score of a chunk that follows cached tokens (its causal
 * mask is an added tensor, so it cannot skip the masked half), and pays a gather of the context, a
 * mask and a dispatch per chunk and layer. Here a chunk's keys are read straight from their blocks,
 * each query row scores only the keys before it, and the step's chunks share one thread team.
 * Layouts (float32, row-major):
 *   q:             [num_tokens, num_heads, head_dim], rows q_stride apart (a view of the q/k/v
 *                  projection's output need not be copied)
 *   key/value:     [num_slots, num_kv_heads, head_dim], slot = block_id * block_size + offset; the
 *                  chunks' own keys and values are already stored
 *   chunks:        [num_chunks, 4] int64: row_start, num_new, start_pos (tokens cached before the
 *                  chunk), first_key_pos (blocks before it were released behind a sliding window)
 *   block_tables:  [num_chunks, max_blocks] int64
 *   out:           [num_tokens, num_heads, head_dim]; only the chunks' rows are written
 * A query at position p sees keys [p - window + 1, p] when window > 0, else [0, p]. Scores are
 * scaled by `scale` and, when softcap > 0, soft-capped as softcap * tanh(score / softcap).
 *
 * Work is cut into tasks: one KV head and up to MAX_ROWS query rows of one chunk (a run of
 * positions, each with the group of query heads that share the KV head, so a key is loaded once
 * for all of them). A task scores KEY_BLOCK keys at a time, query rows across the vector lanes
 * ([key][row] layout: the softmax runs down the keys lane by lane), and folds each block into its
 * running maximum, sum and output (flash attention's online softmax). The cut depends only on the
 * chunk, so a query's result never depends on the step's other chunks or the thread count. Blocks
 * before a chunk's first_key_pos are never read (their table entries may be anything).
 * Built with -ffast-math (sums reassociated, glibc's vector expf): results differ from SDPA's in
 * rounding only. Masked scores are a large finite negative (MASKED) and their weights are set to
 * zero explicitly, so nothing is infinite.
 * Inside torch's process the soname libgomp.so.1 resolves to torch's own runtime, so the kernel
 * shares torch's thread pool instead of fighting it.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Eight floats, a vector register on AVX2; loads and stores go through memcpy (any alignment, no
 * aliasing question) and compile to single moves. */
#ifdef __AVX512F__
typedef float vf8 __attribute__((vector_size(64)));
#define LANES 16
#else
typedef float vf8 __attribute__((vector_size(32)));
#define LANES 8
#endif
#define ROW_TILE (2 * LANES) /* query rows a register tile of scores spans */
#define KEY_TILE 4           /* keys a register tile of scores spans */
#define DIM_TILE (4 * LANES) /* output dims a register tile of the weighted sum spans */
#define KEY_BLOCK 128        /* keys scored before their softmax is folded in */
#define MAX_ROWS 64          /* query rows of a task */
#define MASKED (-1.0e30f)
#define LEAST_EXPONENT (-80.0f) /* exp of it is a normal float, too small to count; lower would
                                 * send glibc's vector expf down its slow path */

static inline vf8 load8(const float *p) {
    vf8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, vf8 v) { memcpy(p, &v, sizeof v); }

/* What a task reads, fixed for the call. */
struct shape {
    const float *q, *key_cache, *value_cache;
    float *out;
    int64_t q_stride, num_heads, num_kv_heads, head_dim, block_size, window;
    float scale, softcap;
};

/* A thread's scratch, sized for the widest task. */
struct scratch {
    float *q_t;    /* [head_dim][rows]: the task's queries, transposed */
    float *scores; /* [KEY_BLOCK][rows]: scores, then weights */
    float *acc;    /* [rows][head_dim]: unnormalized output */
    float *max, *sum, *block_max;
    int32_t *lo, *hi; /* [rows]: each row's visible keys [lo, hi) */
    const float *key_rows[KEY_BLOCK + KEY_TILE], *value_rows[KEY_BLOCK];
};

/* scores[j][r] = scale * q_t[:, r] . key_rows[j] for keys j < len, rows r < rows (a multiple of
 * ROW_TILE): KEY_TILE keys by ROW_TILE rows a register tile, key elements broadcast. */
static void score_block(const struct scratch *s, int64_t len, int64_t rows, int64_t head_dim, float scale) {
    for (int64_t j = 0; j < len; j += KEY_TILE) {
        const float *k0 = s->key_rows[j], *k1 = s->key_rows[j + 1], *k2 = s->key_rows[j + 2],
                    *k3 = s->key_rows[j + 3];
        for (int64_t r = 0; r < rows; r += ROW_TILE) {
            vf8 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
            const float *qd = s->q_t + r;
            for (int64_t d = 0; d < head_dim; ++d, qd += rows) {
                vf8 qa = load8(qd), qb = load8(qd + LANES);
                /* In registers: folded into each FMA as a memory operand, the loads would outnumber
                 * the FMAs and the load ports, not the FMA units, would set the pace. */
                __asm__("" : "+x"(qa), "+x"(qb));
                a0 += k0[d] * qa, b0 += k0[d] * qb;
                a1 += k1[d] * qa, b1 += k1[d] * qb;
                a2 += k2[d] * qa, b2 += k2[d] * qb;
                a3 += k3[d] * qa, b3 += k3[d] * qb;
            }
            const vf8 tiles[KEY_TILE][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}};
            for (int64_t i = 0; i < KEY_TILE && j + i < len; ++i) {
                store8(s->scores + (j + i) * rows + r, tiles[i][0] * scale);
                store8(s->scores + (j + i) * rows + r + LANES, tiles[i][1] * scale);
            }
        }
    }
}

/* acc[r][d0, d0 + DIM_TILE) += sum over keys j < len of weights[j][r] * value_rows[j][d0...] for
 * rows r < used (even), two a register tile; weights rows apart. */
static void weigh_values(struct scratch *s, int64_t len, int64_t used, int64_t rows, int64_t head_dim, int64_t d0) {
    for (int64_t r = 0; r < used; r += 2) {
        float *out0 = s->acc + r * head_dim + d0, *out1 = out0 + head_dim;
        vf8 a0 = load8(out0), a1 = load8(out0 + LANES), a2 = load8(out0 + 2 * LANES), a3 = load8(out0 + 3 * LANES);
        vf8 b0 = load8(out1), b1 = load8(out1 + LANES), b2 = load8(out1 + 2 * LANES), b3 = load8(out1 + 3 * LANES);
        const float *w = s->scores + r;
        for (int64_t j = 0; j < len; ++j, w += rows) {
            const float *v = s->value_rows[j] + d0;
            const vf8 v0 = load8(v), v1 = load8(v + LANES), v2 = load8(v + 2 * LANES), v3 = load8(v + 3 * LANES);
            a0 += w[0] * v0, a1 += w[0] * v1, a2 += w[0] * v2, a3 += w[0] * v3;
            b0 += w[1] * v0, b1 += w[1] * v1, b2 += w[1] * v2, b3 += w[1] * v3;
        }
        store8(out0, a0), store8(out0 + LANES, a1), store8(out0 + 2 * LANES, a2), store8(out0 + 3 * LANES, a3);
        store8(out1, b0), store8(out1 + LANES, b1), store8(out1 + 2 * LANES, b2), store8(out1 + 3 * LANES, b3);
    }
}

/* The same for head dims past the last whole DIM_TILE, one at a time. */
static void weigh_values_tail(struct scratch *s, int64_t len, int64_t used, int64_t rows, int64_t head_dim,
                              int64_t d0) {
    for (int64_t r = 0; r < used; ++r)
        for (int64_t d = d0; d < head_dim; ++d) {
            float a = s->acc[r * head_dim + d];
            for (int64_t j = 0; j < len; ++j) a += s->scores[j * rows + r] * s->value_rows[j][d];
            s->acc[r * head_dim + d] = a;
        }
}

/* Keys [first, first + len) of a task: mask what each row may not see, fold the block's softmax
 * into the running maximum and sum (rescaling the output so far), leave the weights in scores. */
static void softmax_block(struct scratch *s, int64_t first, int64_t len, int64_t rows, int64_t head_dim,
                          float softcap) {
    if (softcap > 0.0f)
        for (int64_t i = 0; i < len * rows; ++i) s->scores[i] = softcap * tanhf(s->scores[i] / softcap);
    float *block_max = s->block_max;
    memcpy(block_max, s->max, sizeof(float) * (size_t)rows);
    for (int64_t j = 0; j < len; ++j) {
        float *row = s->scores + j * rows;
        const int32_t key = (int32_t)(first + j);
#pragma omp simd
        for (int64_t r = 0; r < rows; ++r) {
            row[r] = key >= s->lo[r] && key < s->hi[r] ? row[r] : MASKED;
            block_max[r] = row[r] > block_max[r] ? row[r] : block_max[r];
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        const float shift = s->max[r] - block_max[r];
        const float rescale = expf(shift > LEAST_EXPONENT ? shift : LEAST_EXPONENT);
        s->sum[r] *= rescale;
        s->max[r] = block_max[r];
        if (rescale != 1.0f)
            for (int64_t d = 0; d < head_dim; ++d) s->acc[r * head_dim + d] *= rescale;
    }
    for (int64_t j = 0; j < len; ++j) {
        float *row = s->scores + j * rows;
        const int32_t key = (int32_t)(first + j);
#pragma omp simd
        for (int64_t r = 0; r < rows; ++r) {
            const float shift = row[r] - block_max[r];
            const float weight = expf(shift > LEAST_EXPONENT ? shift : LEAST_EXPONENT);
            row[r] = key >= s->lo[r] && key < s->hi[r] ? weight : 0.0f;
            s->sum[r] += row[r];
        }
    }
}

/* One task: KV head `kv_head`, positions [first_pos, first_pos + num_pos) of a chunk whose rows
 * begin at row_start for position start_pos. */
static void attend_task(const struct shape *x, struct scratch *s, const int64_t *chunk, const int64_t *table,
                        int64_t kv_head, int64_t first_pos, int64_t num_pos) {
    const int64_t group = x->num_heads / x->num_kv_heads, head_dim = x->head_dim;
    const int64_t used = num_pos * group;
    const int64_t rows = (used + ROW_TILE - 1) / ROW_TILE * ROW_TILE;
    const int64_t row_start = chunk[0], start_pos = chunk[2], first_key_pos = chunk[3];
    memset(s->q_t, 0, sizeof(float) * (size_t)(head_dim * rows));
    for (int64_t r = 0; r < rows; ++r) {
        s->max[r] = MASKED;
        s->sum[r] = 0.0f;
        s->lo[r] = s->hi[r] = 0; /* padding rows see nothing */
        if (r >= used) continue;
        const int64_t pos = first_pos + r / group, head = kv_head * group + r % group;
        const float *q = x->q + (row_start + pos - start_pos) * x->q_stride + head * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) s->q_t[d * rows + r] = q[d];
        const int64_t from = x->window > 0 && pos + 1 > x->window ? pos + 1 - x->window : 0;
        s->lo[r] = (int32_t)(from > first_key_pos ? from : first_key_pos);
        s->hi[r] = (int32_t)(pos + 1);
    }
    memset(s->acc, 0, sizeof(float) * (size_t)(rows * head_dim));
    const int64_t kv_stride = x->num_kv_heads * head_dim, offset = kv_head * head_dim;
    const int64_t end = first_pos + num_pos;
    for (int64_t first = s->lo[0]; first < end; first += KEY_BLOCK) {
        const int64_t len = end - first < KEY_BLOCK ? end - first : KEY_BLOCK;
        for (int64_t j = 0; j < len; ++j) {
            const int64_t pos = first + j;
            const int64_t slot = table[pos / x->block_size] * x->block_size + pos % x->block_size;
            s->key_rows[j] = x->key_cache + slot * kv_stride + offset;
            s->value_rows[j] = x->value_cache + slot * kv_stride + offset;
        }
        for (int64_t j = len; j < len + KEY_TILE; ++j) s->key_rows[j] = s->key_rows[len - 1];
        score_block(s, len, rows, head_dim, x->scale);
        softmax_block(s, first, len, rows, head_dim, x->softcap);
        const int64_t even = (used + 1) / 2 * 2;
        int64_t d0 = 0;
        for (; d0 + DIM_TILE <= head_dim; d0 += DIM_TILE) weigh_values(s, len, even, rows, head_dim, d0);
        if (d0 < head_dim) weigh_values_tail(s, len, used, rows, head_dim, d0);
    }
    for (int64_t r = 0; r < used; ++r) {
        const int64_t pos = first_pos + r / group, head = kv_head * group + r % group;
        float *o = x->out + ((row_start + pos - start_pos) * x->num_heads + head) * head_dim;
        const float inv = 1.0f / s->sum[r];
        for (int64_t d = 0; d < head_dim; ++d) o[d] = s->acc[r * head_dim + d] * inv;
    }
}

static void free_scratch(struct scratch *s) {
    free(s->q_t);
    free(s->scores);
    free(s->acc);
    free(s->max);
    free(s->lo);
}

static int alloc_scratch(struct scratch *s, int64_t head_dim) {
    const size_t rows = MAX_ROWS + ROW_TILE;
    s->q_t = malloc(sizeof(float) * (size_t)head_dim * rows);
    s->scores = malloc(sizeof(float) * KEY_BLOCK * rows);
    s->acc = malloc(sizeof(float) * (size_t)head_dim * rows);
    s->max = malloc(sizeof(float) * 3 * rows);
    s->lo = malloc(sizeof(int32_t) * 2 * rows);
    if (s->max != NULL) s->sum = s->max + rows, s->block_max = s->max + 2 * rows;
    if (s->lo != NULL) s->hi = s->lo + rows;
    return s->q_t == NULL || s->scores == NULL || s->acc == NULL || s->max == NULL || s->lo == NULL;
}

int paged_prefill_attention(const float *q, int64_t q_stride, const float *key_cache, const float *value_cache,
                            const int64_t *chunks, const int64_t *block_tables, float *out, int64_t num_chunks,
                            int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                            int64_t block_size, int64_t window, float scale, float softcap) {
    const struct shape x = {q,         key_cache,    value_cache, out,        q_stride, num_heads,
                            num_kv_heads, head_dim, block_size,  window, scale,    softcap};
    const int64_t group = num_heads / num_kv_heads;
    const int64_t positions = MAX_ROWS / group > 0 ? MAX_ROWS / group : 1; /* a task's positions */
    /* first_task[c]: index of chunk c's first task among all; [num_chunks]: the total. */
    int64_t *first_task = malloc(sizeof(int64_t) * (size_t)(num_chunks + 1));
    if (first_task == NULL) return 1;
    first_task[0] = 0;
    for (int64_t c = 0; c < num_chunks; ++c)
        first_task[c + 1] = first_task[c] + num_kv_heads * ((chunks[4 * c + 1] + positions - 1) / positions);
    int failed = 0;
#pragma omp parallel
    {
    struct scratch s;
    const int no_scratch = alloc_scratch(&s, head_dim);
    if (no_scratch) {
#pragma omp atomic write
        failed = 1;
    }
    int64_t c = 0; /* the chunk of the task last taken: monotonic, a thread's tasks only increase */
#pragma omp for schedule(monotonic : dynamic)
    for (int64_t task = 0; task < first_task[num_chunks]; ++task) {
        if (no_scratch) continue;
        while (first_task[c + 1] <= task) ++c;
        const int64_t *chunk = chunks + 4 * c;
        const int64_t index = task - first_task[c], blocks = (chunk[1] + positions - 1) / positions;
        const int64_t first_pos = chunk[2] + index % blocks * positions;
        const int64_t num_pos = chunk[2] + chunk[1] - first_pos < positions ? chunk[2] + chunk[1] - first_pos : positions;
        attend_task(&x, &s, chunk, block_tables + c * max_blocks, index / blocks, first_pos, num_pos);
    }
    free_scratch(&s);
    }
    free(first_task);
    return failed;
}
