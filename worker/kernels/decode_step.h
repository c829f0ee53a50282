/* A step of decodes as the C attention reads it, shared by worker/kernels/paged_decode_attention.c
 * (which attends one layer) and worker/kernels/decode_layers.c (which runs every layer). */
#ifndef CONVEYOR_DECODE_STEP_H
#define CONVEYOR_DECODE_STEP_H
#include <stdint.h>

/* RoPE as worker/kernels/cpu_fused_ops.c's rotary_in_place does it, passed in by address: that
 * file rounds as torch does, which one built with -ffast-math would not. */
typedef void (*rotary_fn)(float *q, float *k, const float *cos, const float *sin, int64_t tokens,
                          int64_t q_heads, int64_t k_heads, int64_t q_stride, int64_t k_stride,
                          int64_t head_dim, int64_t rotary_dim, int64_t table_stride);

/* What every layer of a step shares: its sequences, one new token each. */
struct decode_step {
    const int64_t *slots;
    const int64_t *block_tables;
    const int64_t *context_lens;
    int64_t num_seqs, max_blocks, block_size;
};

/* What one layer keeps from step to step. */
struct decode_layer {
    rotary_fn rotary;
    int64_t num_heads, num_kv_heads, head_dim, window;
    int64_t qkv_bf16, out_bf16; /* q/k/v come in, and the output goes out, as bfloat16 */
    float scale, softcap;
};

/* paged_decode_attention.c's one call a layer: RoPE, the cache stores and the attention. */
typedef int (*decode_layer_attention_fn)(const struct decode_step *step, const struct decode_layer *layer,
                                         void *qkv, int64_t qkv_stride, const float *cos, const float *sin,
                                         int64_t rotary_dim, int64_t table_stride, float *key_cache,
                                         float *value_cache, void *out);

#endif
