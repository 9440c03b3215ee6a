/* Fused CPU merge of bf16 sources, compiled at first use by cpu_native.py:
 *   hm_combine_bf16  linear and slerp (weighted sums of the sources)
 *   hm_merge_bf16    sums of deltas, with TIES' sign consensus, magnitude-range masks
 *                    (ties, breadcrumbs) or DARE's random masks
 *   hm_l1_bf16       the masked L1 norms that DARE rescales by
 *   hm_nearswap_bf16 nearswap: each delta weighted by clamp(t / |delta|, 0, 1)
 *   hm_keep_bf16     arcee_fusion: each delta where its load-time keep bit is set
 *   hm_sce_bf16      sce: a cut of the per-element variance, sign election, weights
 *   hm_ram_bf16      ram and ramplus_tl: each delta by how many models change the element
 * One pass per element block: each source is read once, the result written once,
 * everything in between stays in L1.
 *
 * Bit-identical to fused._merge_segment_fast: the same float32 operations in the
 * same order (compiled with -ffp-contract=off, no fast-math, so no FMA and no
 * reassociation), bf16 rounded to nearest even as torch rounds it. Callers pass
 * only segments proven finite, so NaN handling is not needed.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

#define BLOCK 1024

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The float32 bits of f rounded to bf16 (to nearest even): the bf16 in the upper half. */
static inline uint32_t round_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}

static inline uint16_t f32_to_bf16(float f) {
    return (uint16_t)(round_to_bf16_bits(f) >> 16);
}

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
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

/* out = bf16(B + d * clamp(t / max(|d|, 1e-6), 0, 1)), d = bf16(X - B) */
/* arcee_fusion (reference.fusion_tensor): out = bf16(B + (keep ? d : 0)), d = bf16(X - B),
 * keep the load-time keep bit of the element. */
void hm_keep_bf16(const uint16_t *x, const uint16_t *base, const uint8_t *keep, uint16_t *out, int64_t n) {
    for (int64_t e = 0; e < n; e++) {
        float b = bf16_to_f32(base[e]);
        uint32_t d = round_to_bf16_bits(bf16_to_f32(x[e]) - b);
        out[e] = f32_to_bf16(b + bits_to_f32(d & -(uint32_t)(keep[e] != 0)));
    }
}

/* The larger (smaller) of two finite floats, as a select the loops vectorise. */
static inline float max_f(float a, float b) { return a > b ? a : b; }
static inline float min_f(float a, float b) { return a < b ? a : b; }

void hm_nearswap_bf16(const uint16_t *x, const uint16_t *base, float t, uint16_t *out, int64_t n) {
    for (int64_t e = 0; e < n; e++) {
        float b = bf16_to_f32(base[e]);
        float d = bits_to_f32(round_to_bf16_bits(bf16_to_f32(x[e]) - b));
        float w = min_f(max_f(t / max_f(fabsf(d), 1e-6f), 0.0f), 1.0f);
        out[e] = f32_to_bf16(b + d * w);
    }
}

#define MAX_ROWS 16
#define MAX_PARTS 4
#define MASK_NONE 0
#define MASK_RANGE 1  /* TIES / breadcrumbs: |delta| key ranges and partly kept cut keys */
#define MASK_RANDOM 2 /* DARE: keep where u24 < p0 */
#define KEY_MAX 0x7FFF

/* One segment's merge of deltas, as fused._merge_segment_fast computes it. */
typedef struct {
    int k;             /* rows (models with a nonzero scale), <= MAX_ROWS */
    float scale[MAX_ROWS];
    int consensus;     /* TIES sign election */
    int normalize;     /* consensus: divide by the agreeing weights */
    float weight[MAX_ROWS];
    int w_pos;         /* every weight > 0 */
    float w_min;
    int fix;           /* non-consensus: add +0.0 to the sum */
    float div;         /* non-consensus: divide the sum (when != 1) */
    float lam;         /* multiply the merged delta (when != 1) */
    int mask;          /* MASK_* */
    int need_lo, need_hi, n_parts;
    int32_t am1[MAX_ROWS], nb1[MAX_ROWS];            /* keep: key > am1 and key < -nb1 */
    int32_t part_key[MAX_PARTS][MAX_ROWS], part_q[MAX_PARTS][MAX_ROWS];
    int32_t p0[MAX_ROWS];
    int32_t k1[MAX_ROWS], mult[MAX_ROWS];            /* element hash keys */
} hm_plan;

/* lowbias32(x) >> 8: reference.random_u24 */
static inline int32_t u24(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return (int32_t)(x >> 8);
}

/* The element hash of row m for elements elem .. elem + len - 1 (int32 index, wrapping). */
static void row_hash(const hm_plan *p, int m, int64_t elem, int len, int32_t *h) {
    uint32_t e0 = (uint32_t)elem, mult = (uint32_t)p->mult[m], k1 = (uint32_t)p->k1[m];
    for (int e = 0; e < len; e++) h[e] = u24((e0 + (uint32_t)e) * mult + k1);
}

/* Terms of row m over a block: bf16(X - B), masked to +0 where dropped, times scale.
 * Masks are computed branch-free so that the loops vectorise. */
static void row_terms(const hm_plan *p, int m, const uint16_t *x, const float *b, int64_t elem,
                      int len, float *t) {
    /* d: the bf16 delta held in the upper half of a 32-bit word (its float32 bits),
     * so that every loop runs on 32-bit lanes */
    uint32_t d[BLOCK];
    int32_t h[BLOCK];
    for (int e = 0; e < len; e++) d[e] = round_to_bf16_bits(bf16_to_f32(x[e]) - b[e]);
    if (p->mask == MASK_RANGE) {
        int32_t am1 = p->am1[m], nb1 = p->nb1[m];
        uint32_t keep[BLOCK];
        if (p->need_lo && p->need_hi) {
            for (int e = 0; e < len; e++) {
                int32_t key = (int32_t)(d[e] >> 16) & KEY_MAX;
                keep[e] = (am1 - key < 0) & (key + nb1 < 0);
            }
        } else if (p->need_lo) {
            for (int e = 0; e < len; e++) keep[e] = am1 - ((int32_t)(d[e] >> 16) & KEY_MAX) < 0;
        } else if (p->need_hi) {
            for (int e = 0; e < len; e++) keep[e] = ((int32_t)(d[e] >> 16) & KEY_MAX) + nb1 < 0;
        } else {
            for (int e = 0; e < len; e++) keep[e] = 0;
        }
        if (p->n_parts) {
            row_hash(p, m, elem, len, h);
            for (int t = 0; t < p->n_parts; t++) {
                int32_t c = p->part_key[t][m], q = p->part_q[t][m];
                for (int e = 0; e < len; e++)
                    keep[e] |= (((int32_t)(d[e] >> 16) & KEY_MAX) == c) & (h[e] < q);
            }
        }
        for (int e = 0; e < len; e++) d[e] &= -keep[e];
    } else if (p->mask == MASK_RANDOM) {
        int32_t p0 = p->p0[m];
        row_hash(p, m, elem, len, h);
        for (int e = 0; e < len; e++) d[e] &= -(uint32_t)(h[e] < p0);
    }
    float s = p->scale[m];
    for (int e = 0; e < len; e++) t[e] = bits_to_f32(d[e]) * s;
}

/* TIES over a block: acc = s * sum(max(s * t_m, 0)), s = sign of the total (+1 for +0),
 * divided by the agreeing weights when normalizing; every row's terms are used twice. */
static void consensus_block(const hm_plan *p, const uint16_t *const *rows, const float *b,
                            int64_t elem, int64_t lo, int len, float terms[][BLOCK], float *acc) {
    float sgn[BLOCK], divisor[BLOCK];
    int k = p->k;
    for (int m = 0; m < k; m++) row_terms(p, m, rows[m] + lo, b, elem, len, terms[m]);
    for (int e = 0; e < len; e++) acc[e] = terms[0][e];
    for (int m = 1; m < k; m++)
        for (int e = 0; e < len; e++) acc[e] = acc[e] + terms[m][e];
    for (int e = 0; e < len; e++) sgn[e] = copysignf(1.0f, acc[e]);
    for (int m = 0; m < k; m++)
        for (int e = 0; e < len; e++) {
            float v = terms[m][e] * sgn[e];
            terms[m][e] = v > 0.0f ? v : 0.0f;
        }
    for (int e = 0; e < len; e++) acc[e] = terms[0][e];
    for (int m = 1; m < k; m++)
        for (int e = 0; e < len; e++) acc[e] = acc[e] + terms[m][e];
    for (int e = 0; e < len; e++) acc[e] = acc[e] * sgn[e] + 0.0f;
    if (!p->normalize)
        return;
    float w0 = p->weight[0], w_min = p->w_min;
    for (int e = 0; e < len; e++) divisor[e] = terms[0][e] > 0.0f ? w0 : 0.0f;
    for (int m = 1; m < k; m++) {
        float w = p->weight[m];
        for (int e = 0; e < len; e++) divisor[e] = divisor[e] + (terms[m][e] > 0.0f ? w : 0.0f);
    }
    if (p->w_pos) {
        for (int e = 0; e < len; e++) divisor[e] = divisor[e] >= w_min ? divisor[e] : w_min;
    } else {
        for (int e = 0; e < len; e++) divisor[e] = divisor[e] == 0.0f ? 1.0f : divisor[e];
    }
    for (int e = 0; e < len; e++) acc[e] = acc[e] / divisor[e];
}

/* out = bf16(merged delta * lam + B); elem: the hash index of out[0] */
void hm_merge_bf16(const hm_plan *p, const uint16_t *const *rows, const uint16_t *base,
                   int64_t elem, uint16_t *out, int64_t n) {
    float terms[MAX_ROWS][BLOCK];
    float acc[BLOCK];
    float b[BLOCK];
    int k = p->k;
    float div = p->div, lam = p->lam;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int len = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        for (int e = 0; e < len; e++) b[e] = bf16_to_f32(base[lo + e]);
        if (p->consensus) {
            consensus_block(p, rows, b, elem + lo, lo, len, terms, acc);
        } else {
            if (p->mask == MASK_NONE) {
                /* task_arithmetic: straight into the sum, the smallest working set */
                for (int m = 0; m < k; m++) {
                    const uint16_t *x = rows[m] + lo;
                    float s = p->scale[m];
                    if (m == 0)
                        for (int e = 0; e < len; e++)
                            acc[e] = bits_to_f32(round_to_bf16_bits(bf16_to_f32(x[e]) - b[e])) * s;
                    else
                        for (int e = 0; e < len; e++)
                            acc[e] = acc[e] + bits_to_f32(round_to_bf16_bits(bf16_to_f32(x[e]) - b[e])) * s;
                }
            } else {
                row_terms(p, 0, rows[0] + lo, b, elem + lo, len, acc);
                for (int m = 1; m < k; m++) {
                    row_terms(p, m, rows[m] + lo, b, elem + lo, len, terms[0]);
                    for (int e = 0; e < len; e++) acc[e] = acc[e] + terms[0][e];
                }
            }
            if (p->fix)
                for (int e = 0; e < len; e++) acc[e] = acc[e] + 0.0f;
            if (div != 1.0f)
                for (int e = 0; e < len; e++) acc[e] = acc[e] / div;
        }
        if (lam != 1.0f)
            for (int e = 0; e < len; e++) acc[e] = acc[e] * lam;
        for (int e = 0; e < len; e++) out[lo + e] = f32_to_bf16(acc[e] + b[e]);
    }
}

/* sums[m] = sum of |masked delta| of row m, in float64 (the L1 that DARE rescales by).
 * Any summation order: the caller uses it only where every order gives the same value. */
void hm_l1_bf16(const hm_plan *p, const uint16_t *const *rows, const uint16_t *base,
                int64_t elem, int64_t n, double *sums) {
    float t[BLOCK];
    float b[BLOCK];
    hm_plan unit = *p;
    for (int m = 0; m < p->k; m++) unit.scale[m] = 1.0f;
    for (int m = 0; m < p->k; m++) sums[m] = 0.0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int len = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        for (int e = 0; e < len; e++) b[e] = bf16_to_f32(base[lo + e]);
        for (int m = 0; m < p->k; m++) {
            row_terms(&unit, m, rows[m] + lo, b, elem + lo, len, t);
            double lane[8] = {0};  /* eight independent sums: vectorises without reassociation */
            int e = 0;
            for (; e + 8 <= len; e += 8)
                for (int i = 0; i < 8; i++) lane[i] += (double)fabsf(t[e + i]);
            for (; e < len; e++) lane[0] += (double)fabsf(t[e]);
            for (int i = 0; i < 8; i++) sums[m] += lane[i];
        }
    }
}

/* The magnitude key of the bf16 value of f (f rounded to bf16 first). */
static inline int32_t bf16_key(float f) {
    return (int32_t)(round_to_bf16_bits(f) >> 16) & KEY_MAX;
}

/* SCE (reference.sce_var_keys and sce_combine): per element, the variance of the k deltas
 * in float64 (mean, then squared deviations, model after model) rounded to float32 and to
 * bf16 decides the selection (variance keys in (lo, hi), and == lo (hi) iff u24 < q_lo
 * (q_hi)); the selected deltas elect a sign from their sum, and the agreeing ones are
 * averaged with the weights w, the divisor at least 1e-6. cut = {lo, hi, q_lo, q_hi}.
 * Block by block, model after model (faster here than registers: the float64 steps). */
void hm_sce_bf16(const uint16_t *const *rows, int k, const uint16_t *base, const float *w,
                 const int32_t *cut, uint32_t k1, uint32_t mult, int64_t elem, uint16_t *out,
                 int64_t n) {
    float d[MAX_ROWS][BLOCK];
    float b[BLOCK], sum[BLOCK], mixed[BLOCK], divisor[BLOCK];
    double total[BLOCK], dev[BLOCK];
    int32_t keep[BLOCK];
    int32_t lo_key = cut[0], hi_key = cut[1], q_lo = cut[2], q_hi = cut[3];
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int len = (int)(n - lo < BLOCK ? n - lo : BLOCK);
        for (int e = 0; e < len; e++) {
            b[e] = bf16_to_f32(base[lo + e]);
            total[e] = 0.0;
            dev[e] = 0.0;
        }
        for (int m = 0; m < k; m++) {
            const uint16_t *x = rows[m] + lo;
            for (int e = 0; e < len; e++) {
                d[m][e] = bits_to_f32(round_to_bf16_bits(bf16_to_f32(x[e]) - b[e]));
                total[e] = total[e] + (double)d[m][e];
            }
        }
        for (int e = 0; e < len; e++) total[e] = total[e] / k; /* the mean */
        for (int m = 0; m < k; m++)
            for (int e = 0; e < len; e++) {
                double c = (double)d[m][e] - total[e];
                dev[e] = dev[e] + c * c;
            }
        for (int e = 0; e < len; e++) {
            int32_t key = bf16_key((float)(dev[e] / k));
            int32_t u = u24((uint32_t)(elem + lo + e) * mult + k1);
            keep[e] = (key > lo_key && key < hi_key) | (key == lo_key && u < q_lo) | (key == hi_key && u < q_hi);
            sum[e] = 0.0f;
            mixed[e] = 0.0f;
            divisor[e] = 0.0f;
        }
        for (int m = 0; m < k; m++)
            for (int e = 0; e < len; e++) {
                d[m][e] = keep[e] ? d[m][e] : 0.0f;
                sum[e] = sum[e] + d[m][e];
            }
        for (int m = 0; m < k; m++) {
            float wm = w[m];
            for (int e = 0; e < len; e++) {
                int agree = sum[e] >= 0.0f ? d[m][e] > 0.0f : d[m][e] < 0.0f;
                mixed[e] = mixed[e] + (agree ? d[m][e] * wm : 0.0f);
                divisor[e] = divisor[e] + (agree ? wm : 0.0f);
            }
        }
        for (int e = 0; e < len; e++)
            out[lo + e] = f32_to_bf16(b[e] + mixed[e] / (divisor[e] < 1e-6f ? 1e-6f : divisor[e]));
    }
}

/* RAM runs element by element with the models in registers: written for a count K of
 * models known when it is compiled (always inlined with a constant K, 1 to 8), so that
 * the loop over elements vectorises; other counts take the same code with K at run time. */
#define INLINE static inline __attribute__((always_inline))
#define BY_COUNT(CALL)                                                                      \
    switch (k) {                                                                            \
    case 1: CALL(1); break;                                                                 \
    case 2: CALL(2); break;                                                                 \
    case 3: CALL(3); break;                                                                 \
    case 4: CALL(4); break;                                                                 \
    case 5: CALL(5); break;                                                                 \
    case 6: CALL(6); break;                                                                 \
    case 7: CALL(7); break;                                                                 \
    case 8: CALL(8); break;                                                                 \
    default: CALL(k);                                                                       \
    }

/* RAM and RAM+ (reference.ram_combine): per element, the count c of deltas whose key is
 * above `threshold`; one such delta enters times its lambda, several as bf16(d / c) each;
 * RAM (plus 0) rounds the sum to bf16 before adding the base. */
INLINE void ram_rows(const uint16_t *const *rows, const int K, const uint16_t *base, const float *lambda,
                     int32_t threshold, int plus, uint16_t *out, int64_t n) {
    for (int64_t e = 0; e < n; e++) {
        uint32_t d[MAX_ROWS];
        int32_t nz[MAX_ROWS];
        float b = bf16_to_f32(base[e]);
        int32_t count = 0;
        for (int m = 0; m < K; m++) {
            d[m] = round_to_bf16_bits(bf16_to_f32(rows[m][e]) - b);
            nz[m] = (int32_t)(d[m] >> 16 & KEY_MAX) > threshold;
            count += nz[m];
        }
        float c = count > 1 ? (float)count : 1.0f;
        float total = 0.0f;
        for (int m = 0; m < K; m++) {
            float v = bits_to_f32(d[m]);
            float unique = v * lambda[m];
            float shared = bits_to_f32(round_to_bf16_bits(v / c));
            float t = nz[m] ? (count == 1 ? unique : shared) : 0.0f;
            total = total + t;
        }
        if (!plus) total = bits_to_f32(round_to_bf16_bits(total));
        out[e] = f32_to_bf16(b + total);
    }
}

void hm_ram_bf16(const uint16_t *const *rows, int k, const uint16_t *base, const float *lambda,
                 int32_t threshold, int plus, uint16_t *out, int64_t n) {
#define RAM(K) ram_rows(rows, K, base, lambda, threshold, plus, out, n)
    BY_COUNT(RAM)
#undef RAM
}
