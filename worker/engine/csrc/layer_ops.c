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

/* f rounded to bf16 precision (round to nearest even), kept as a float. */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
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
            float normed = get(residual, base + i, bf16) * inv;
            if (bf16) normed = round_bf16(normed);
            put(out, base + i, get(weight, i, bf16) * normed, bf16);
        }
    }
}

/* Rotary embedding in place on `heads` heads of size d at the start of each row of `x` (row
 * stride `stride`), rotate-half convention: cos and sin are [rows, d]. As torch: in bf16 each
 * product is rounded to bf16 before the sum. */
void inferq_rotary(void *x, int64_t stride, const void *cos, const void *sin, int64_t rows,
                   int64_t heads, int64_t d, int bf16, int threads) {
    int64_t half = d / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        float c[512], s[512];
        for (int64_t i = 0; i < d; i++) {
            c[i] = get(cos, r * d + i, bf16);
            s[i] = get(sin, r * d + i, bf16);
        }
        for (int64_t h = 0; h < heads; h++) {
            int64_t at = r * stride + h * d;
            float lo[256], hi[256];
            for (int64_t i = 0; i < half; i++) {
                float a = get(x, at + i, bf16), b = get(x, at + half + i, bf16);
                float lc = a * c[i], ls = -b * s[i], hc = b * c[half + i], hs = a * s[half + i];
                if (bf16) {
                    lc = round_bf16(lc);
                    ls = round_bf16(ls);
                    hc = round_bf16(hc);
                    hs = round_bf16(hs);
                }
                lo[i] = lc + ls;
                hi[i] = hc + hs;
            }
            for (int64_t i = 0; i < half; i++) {
                put(x, at + i, lo[i], bf16);
                put(x, at + half + i, hi[i], bf16);
            }
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
            if (bf16) act = round_bf16(act); /* torch rounds silu's result before the product */
            put(out, r * width + i, act * u, bf16);
        }
}

/* The new tokens' K and V into the paged caches: for kv head h and token t, `dim` elements
 * (esize bytes each) from qkv[t * stride + at_k + h * dim] (and at_v) to row rows[h * tokens + t]
 * of k_cache (and v_cache). */
void inferq_kv_write(const void *qkv, int64_t stride, int64_t at_k, int64_t at_v,
                     const int64_t *rows, void *k_cache, void *v_cache, int64_t tokens,
                     int64_t kv_heads, int64_t dim, int64_t esize, int threads) {
    const size_t n = (size_t)(dim * esize);
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens * kv_heads > 512)
    for (int64_t i = 0; i < kv_heads * tokens; i++) {
        const char *src = (const char *)qkv + ((i % tokens) * stride + (i / tokens) * dim) * esize;
        memcpy((char *)k_cache + rows[i] * n, src + at_k * esize, n);
        memcpy((char *)v_cache + rows[i] * n, src + at_v * esize, n);
    }
}
