/* The small per-layer operations of a Llama-family decoder, fused so each reads its rows once:
 * RMSNorm with the residual add, rotary embedding in place, SiLU(gate) * up. Rows are
 * [tokens, width] contiguous, fp32 or bf16 (bf16 = 1), computed in fp32; OpenMP over rows.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float get(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void put(void *p, int64_t i, float f, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even */
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

/* residual += x (when x is given), then out = rmsnorm(residual) * weight. As transformers'
 * LlamaRMSNorm: the normalized row is rounded to the row dtype before the weight multiplies
 * it, and that product rounded again. */
void inferq_add_rmsnorm(const void *x, void *residual, const void *weight, void *out,
                        int64_t rows, int64_t width, float eps, int bf16, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        int64_t base = r * width;
        float ss = 0.0f;
        for (int64_t i = 0; i < width; i++) {
            float h = get(residual, base + i, bf16);
            if (x) {
                h += get(x, base + i, bf16);
                put(residual, base + i, h, bf16);
                h = get(residual, base + i, bf16); /* the rounded sum, as torch keeps it */
            }
            ss += h * h;
        }
        float inv = 1.0f / sqrtf(ss / (float)width + eps);
        for (int64_t i = 0; i < width; i++) {
            put(out, base + i, get(residual, base + i, bf16) * inv, bf16);
            put(out, base + i, get(weight, i, bf16) * get(out, base + i, bf16), bf16);
        }
    }
}

/* Rotary embedding in place on `heads` heads of size d at the start of each row of `x` (row
 * stride `stride`), rotate-half convention: cos and sin are [rows, d]. */
void inferq_rotary(void *x, int64_t stride, const void *cos, const void *sin, int64_t rows,
                   int64_t heads, int64_t d, int bf16, int threads) {
    int64_t half = d / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            int64_t at = r * stride + h * d;
            for (int64_t i = 0; i < half; i++) {
                float a = get(x, at + i, bf16), b = get(x, at + half + i, bf16);
                float c1 = get(cos, r * d + i, bf16), s1 = get(sin, r * d + i, bf16);
                float c2 = get(cos, r * d + half + i, bf16), s2 = get(sin, r * d + half + i, bf16);
                /* as torch: each product rounded to the dtype, then the sum */
                float lo_c = a * c1, lo_s = -b * s1, hi_c = b * c2, hi_s = a * s2;
                if (bf16) {
                    uint16_t t[4];
                    put(t, 0, lo_c, 1);
                    put(t, 1, lo_s, 1);
                    put(t, 2, hi_c, 1);
                    put(t, 3, hi_s, 1);
                    lo_c = get(t, 0, 1);
                    lo_s = get(t, 1, 1);
                    hi_c = get(t, 2, 1);
                    hi_s = get(t, 3, 1);
                }
                put(x, at + i, lo_c + lo_s, bf16);
                put(x, at + half + i, hi_c + hi_s, bf16);
            }
        }
}

/* out[r, i] = silu(gu[r, i]) * gu[r, width + i]: the fused gate/up projection's halves. */
void inferq_silu_mul(const void *gu, void *out, int64_t rows, int64_t width, int bf16,
                     int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < width; i++) {
            float g = get(gu, r * 2 * width + i, bf16), u = get(gu, r * 2 * width + width + i, bf16);
            float act = g / (1.0f + expf(-g));
            if (bf16) { /* torch rounds silu's result before the product */
                uint16_t t;
                put(&t, 0, act, 1);
                act = get(&t, 0, 1);
            }
            put(out, r * width + i, act * u, bf16);
        }
}
