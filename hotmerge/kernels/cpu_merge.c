/* Fused CPU merge of bf16 sources for the element-wise methods (linear,
 * task_arithmetic and every method whose masks keep everything), compiled at first
 * use by cpu_native.py. One pass per element block: each source is read once, the
 * result written once, everything in between stays in registers / L1.
 *
 * Bit-identical to fused._merge_segment_fast: the same float32 operations in the
 * same order (compiled with -ffp-contract=off, no fast-math, so no FMA and no
 * reassociation), bf16 rounded to nearest even as torch rounds it. Callers pass
 * only segments proven finite, so NaN handling is not needed.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 1024

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* out = bf16((X_0*c_0 + X_1*c_1 + ... [+ 0.0]) / div)  (div applied when != 1) */
void hm_combine_bf16(const uint16_t *const *rows, const float *coef, int k, int fix,
                     float div, uint16_t *out, int64_t n) {
    float acc[BLOCK];
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int64_t len = n - lo < BLOCK ? n - lo : BLOCK;
        const uint16_t *x = rows[0] + lo;
        float c = coef[0];
        for (int64_t e = 0; e < len; e++) acc[e] = bf16_to_f32(x[e]) * c;
        for (int m = 1; m < k; m++) {
            x = rows[m] + lo;
            c = coef[m];
            for (int64_t e = 0; e < len; e++) acc[e] = acc[e] + bf16_to_f32(x[e]) * c;
        }
        if (fix)
            for (int64_t e = 0; e < len; e++) acc[e] = acc[e] + 0.0f;
        if (div != 1.0f)
            for (int64_t e = 0; e < len; e++) acc[e] = acc[e] / div;
        for (int64_t e = 0; e < len; e++) out[lo + e] = f32_to_bf16(acc[e]);
    }
}

/* d_m = bf16(X_m - B);  out = bf16(((d_0*s_0 + d_1*s_1 + ... [+ 0.0]) / div) * lam + B) */
void hm_sum_deltas_bf16(const uint16_t *const *rows, const uint16_t *base, const float *scale,
                        int k, int fix, float div, float lam, uint16_t *out, int64_t n) {
    float acc[BLOCK];
    float b[BLOCK];
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int64_t len = n - lo < BLOCK ? n - lo : BLOCK;
        for (int64_t e = 0; e < len; e++) b[e] = bf16_to_f32(base[lo + e]);
        for (int m = 0; m < k; m++) {
            const uint16_t *x = rows[m] + lo;
            float s = scale[m];
            if (m == 0) {
                for (int64_t e = 0; e < len; e++)
                    acc[e] = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[e]) - b[e])) * s;
            } else {
                for (int64_t e = 0; e < len; e++)
                    acc[e] = acc[e] + bf16_to_f32(f32_to_bf16(bf16_to_f32(x[e]) - b[e])) * s;
            }
        }
        if (fix)
            for (int64_t e = 0; e < len; e++) acc[e] = acc[e] + 0.0f;
        if (div != 1.0f)
            for (int64_t e = 0; e < len; e++) acc[e] = acc[e] / div;
        if (lam != 1.0f)
            for (int64_t e = 0; e < len; e++) acc[e] = acc[e] * lam;
        for (int64_t e = 0; e < len; e++) out[lo + e] = f32_to_bf16(acc[e] + b[e]);
    }
}
