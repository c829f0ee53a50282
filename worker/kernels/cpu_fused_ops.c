/* A decoder layer's element-wise steps on a CPU, each in one pass, in float32.
 *
 * Each of these is several torch operations in the decoder (RoPE nine per tensor, a norm seven, the
 * activation three); at one stream a layer's step is some seventy torch operations, whose dispatch
 * costs more than their arithmetic. Built with -ffp-contract=off: RoPE rounds each product
 * and then their sum exactly as torch does. The norm and the activation sum and exponentiate in
 * another order than torch: float32 output is not torch's bit for bit, and the parity tests hold it
 * token-identical to transformers, as they hold the C attention kernels.
 * The norm and the activation also read and write bfloat16 (the input and output of a weight-only
 * quantized linear), converting as torch does: exactly up, and down rounding to nearest even, so
 * that skipping torch's casts around those layers changes nothing.
 * Rows are spread over OpenMP threads when there are many (a prefill chunk); inside torch's process
 * libgomp.so.1 resolves to torch's own runtime.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bfloat16.h"

#define PARALLEL_ROWS 16

#define RUN 256 /* elements converted at a time, on the stack */

/* exp(x) in a form the compiler vectorizes (glibc's expf is a call per element, most of the
 * activation's time): x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two parts, Cody and Waite),
 * exp(r) by Cephes' degree-6 polynomial (within 2 ulp of expf), times 2^n through the exponent
 * bits. x is clamped where exp(x) leaves float32's normal range, which silu saturates anyway; n
 * is read from the rounded sum's low bits, so even a NaN (which comes out NaN) converts nothing. */
static inline float vector_exp(float x) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float shifted = x * 1.44269504088896341f + shifter;
    const float n = shifted - shifter;
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits); /* n + 2^22 in the low 23 bits */
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

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

/* out = norm(x + residual): total / sqrt(mean(total^2) + eps), times weight (plain) or (1 + weight)
 * (Gemma). total (float32) receives x + residual, or x itself where x is bfloat16 without a
 * residual; it is not written (and may be NULL) where x is float32 without one. Element sizes
 * (sizeof(float) or 2) follow x_bf16 and out_bf16; strides count elements. */
void rms_norm(const void *x, int64_t x_bf16, const float *residual, const float *weight, void *out,
              int64_t out_bf16, float *total, int64_t rows, int64_t width, int64_t x_stride,
              int64_t residual_stride, int64_t out_stride, float eps, int64_t mode) {
    const size_t x_size = x_bf16 ? sizeof(uint16_t) : sizeof(float);
    const size_t out_size = out_bf16 ? sizeof(uint16_t) : sizeof(float);
#pragma omp parallel for if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const char *xr = (const char *)x + r * x_stride * x_size;
        char *o = (char *)out + r * out_stride * out_size;
        const float *sum = (const float *)xr;
        if (residual != NULL || x_bf16) {
            const float *res = residual == NULL ? NULL : residual + r * residual_stride;
            float *tr = total + r * width;
            read_floats(xr, width, x_bf16, tr);
            if (res != NULL) {
#pragma omp simd
                for (int64_t i = 0; i < width; ++i) tr[i] += res[i];
            }
            sum = tr;
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < width; ++i) squares += sum[i] * sum[i];
        const float inv = 1.0f / sqrtf(squares / (float)width + eps);
        for (int64_t start = 0; start < width; start += RUN) {
            const int64_t n = width - start < RUN ? width - start : RUN;
            const float *s = sum + start, *w = weight + start;
            float normed[RUN];
            if (mode == NORM_GEMMA) {
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) normed[i] = s[i] * inv * (1.0f + w[i]);
            } else {
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) normed[i] = w[i] * (s[i] * inv);
            }
            write_floats(normed, n, out_bf16, o + start * out_size);
        }
    }
}

/* x: [rows, 2 * width] = [gate | up] with rows `x_stride` elements apart; out [rows, width] =
 * silu(gate) * up. Either may be float32 or bfloat16, as x_bf16 and out_bf16 say. */
void silu_and_mul(const void *x, int64_t x_bf16, void *out, int64_t out_bf16, int64_t rows, int64_t width,
                  int64_t x_stride) {
    const size_t x_size = x_bf16 ? sizeof(uint16_t) : sizeof(float);
    const size_t out_size = out_bf16 ? sizeof(uint16_t) : sizeof(float);
#pragma omp parallel for if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const char *gate = (const char *)x + r * x_stride * x_size;
        const char *up = gate + width * x_size;
        char *o = (char *)out + r * width * out_size;
        for (int64_t start = 0; start < width; start += RUN) {
            const int64_t n = width - start < RUN ? width - start : RUN;
            float g[RUN], u[RUN];
            read_floats(gate + start * x_size, n, x_bf16, g);
            read_floats(up + start * x_size, n, x_bf16, u);
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.0f + vector_exp(-g[i])) * u[i];
            write_floats(g, n, out_bf16, o + start * out_size);
        }
    }
}
