/* A decoder layer's element-wise steps on a CPU, each in one pass, float32.
 *
 * Each of these is several torch operations in the decoder (RoPE nine per tensor, a norm seven, the
 * activation three); at one stream a layer's step is some seventy torch operations, whose dispatch
 * costs more than their arithmetic. Built with -ffp-contract=off: RoPE rounds each product
 * and then their sum exactly as torch does, so float32 output stays token-identical. The norm and
 * the activation sum and exponentiate in another order than torch, so only models that are not
 * exact anyway (quantized weights) use them.
 * Rows are spread over OpenMP threads when there are many (a prefill chunk); inside torch's process
 * libgomp.so.1 resolves to torch's own runtime.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define PARALLEL_ROWS 16

/* x: [tokens, heads, head_dim] with rows `stride` apart and heads head_dim apart; rotate the first
 * rotary_dim of each head in place: (x * cos) + (rotate_half(x) * sin), rotate_half(x) = [-x2, x1]. */
static void rotate(float *x, const float *cos, const float *sin, int64_t tokens, int64_t heads,
                   int64_t stride, int64_t head_dim, int64_t rotary_dim, int64_t table_stride) {
    const int64_t half = rotary_dim / 2;
#pragma omp parallel for if (tokens >= PARALLEL_ROWS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos + t * table_stride;
        const float *s = sin + t * table_stride;
        for (int64_t h = 0; h < heads; ++h) {
            float *first = x + t * stride + h * head_dim;
            float *second = first + half;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = first[i], x2 = second[i];
                first[i] = x1 * c[i] + (-x2) * s[i];
                second[i] = x2 * c[half + i] + x1 * s[half + i];
            }
        }
    }
}

void rotary_in_place(float *q, float *k, const float *cos, const float *sin, int64_t tokens,
                     int64_t q_heads, int64_t k_heads, int64_t q_stride, int64_t k_stride,
                     int64_t head_dim, int64_t rotary_dim, int64_t table_stride) {
    rotate(q, cos, sin, tokens, q_heads, q_stride, head_dim, rotary_dim, table_stride);
    rotate(k, cos, sin, tokens, k_heads, k_stride, head_dim, rotary_dim, table_stride);
}

enum { NORM_PLAIN = 0, NORM_GEMMA = 1 };

/* total = x + residual (residual may be NULL: total is x and is not written); out = norm(total):
 * total / sqrt(mean(total^2) + eps), times weight (plain) or (1 + weight) (Gemma). */
void rms_norm(const float *x, const float *residual, const float *weight, float *out, float *total,
              int64_t rows, int64_t width, int64_t x_stride, int64_t residual_stride,
              int64_t out_stride, float eps, int64_t mode) {
#pragma omp parallel for if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        const float *sum = xr;
        if (residual != NULL) {
            const float *res = residual + r * residual_stride;
            float *tr = total + r * out_stride;
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) tr[i] = xr[i] + res[i];
            sum = tr;
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < width; ++i) squares += sum[i] * sum[i];
        const float inv = 1.0f / sqrtf(squares / (float)width + eps);
        if (mode == NORM_GEMMA) {
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) o[i] = sum[i] * inv * (1.0f + weight[i]);
        } else {
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) o[i] = weight[i] * (sum[i] * inv);
        }
    }
}

/* x: [rows, 2 * width] = [gate | up] with rows `x_stride` apart; out [rows, width] = silu(gate) * up. */
void silu_and_mul(const float *x, float *out, int64_t rows, int64_t width, int64_t x_stride) {
#pragma omp parallel for if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const float *gate = x + r * x_stride;
        const float *up = gate + width;
        float *o = out + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
