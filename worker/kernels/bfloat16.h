/* bfloat16 <-> float32 as torch converts: exactly up, and down to nearest even (NaN to a quiet
 * NaN). Shared by the C kernels, so that handing bfloat16 to or from torch's kernels rounds
 * exactly as torch's own casts would. */
#ifndef CONVEYOR_BFLOAT16_H
#define CONVEYOR_BFLOAT16_H
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0; /* NaN, by its bits: -ffast-math keeps this */
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* n elements of a row held as float32 (is_bf16 == 0) or bfloat16, to and from float32: one
 * branch a run, so that the loops stay vector loops. */
static inline void read_floats(const void *row, int64_t n, int64_t is_bf16, float *dst) {
    if (is_bf16)
        for (int64_t i = 0; i < n; ++i) dst[i] = from_bf16(((const uint16_t *)row)[i]);
    else
        memcpy(dst, row, sizeof(float) * (size_t)n);
}

static inline void write_floats(const float *src, int64_t n, int64_t is_bf16, void *row) {
    if (is_bf16)
        for (int64_t i = 0; i < n; ++i) ((uint16_t *)row)[i] = to_bf16(src[i]);
    else
        memcpy(row, src, sizeof(float) * (size_t)n);
}

#endif
