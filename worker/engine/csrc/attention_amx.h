/* Attention's tile pass on AMX: the tile's rows x G query heads (as 16-row blocks) against
 * its shared keys, 64 keys a chunk, in bf16 with fp32 accumulation and an online softmax:
 * S = Q K^T on tiles (K's chunk laid out once as the B operand: pairs of dimensions per key),
 * the softmax on vectors (P rounded to bf16, as bf16 flash attention does), O += P V on tiles
 * (V's chunk laid out once as pairs of keys per dimension). Leaves the same state as the vector
 * tile pass. Included by paged_attention.c after its vector helpers, where the compiler
 * targets AMX-BF16; bf16 caches and head sizes 32, 64 and 128 only.
 */
#include "amx.h"

#define KC 64 /* keys a chunk */

/* Tile `c` (0-3) += A (tile 4) x B loaded from `b` (stride bytes) into tile 5. */
#define DP_INTO(c, b, stride)                                                                  \
    do {                                                                                       \
        _tile_loadd(5, b, stride);                                                             \
        _tile_dpbf16ps(c, 4, 5);                                                               \
    } while (0)

/* Keys [start, start + n) of one kv head as the two B layouts: kt[D/2][KC] (dimension pairs
 * of each key) and vp[KC/2][D] (key pairs of each dimension); zeros past n. */
static void amx_chunk(const uint16_t *kc, const uint16_t *vc, int64_t head_base,
                      const int32_t *table, int64_t start, int64_t n, int64_t bs, int64_t D,
                      uint32_t *kt, uint16_t *vp) {
    for (int64_t x = 0; x < KC; x++) {
        if (x >= n) {
            for (int64_t i = 0; i < D / 2; i++) kt[i * KC + x] = 0;
            for (int64_t d = 0; d < D; d++) vp[((x / 2) * D + d) * 2 + (x & 1)] = 0;
            continue;
        }
        const int64_t key = start + x;
        const int64_t row = (head_base + (int64_t)table[key / bs] * bs + key % bs) * D;
        const uint32_t *k2 = (const uint32_t *)(kc + row);
        for (int64_t i = 0; i < D / 2; i++) kt[i * KC + x] = k2[i];
        for (int64_t d = 0; d < D; d++) vp[((x / 2) * D + d) * 2 + (x & 1)] = vc[row + d];
    }
}

/* 2^t on VL lanes to about 4e-6 relative (degree-4 polynomial on the fraction, vscalefps for
 * the power of two: 0 far below, no clamping needed): enough for weights rounded to bf16. */
static inline vf exp2_bf16(vf t) {
    const __m512 n = _mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const vf f = t - (vf)n;
    vf p = 1.3697664e-2f * f + 5.1690358e-2f;
    p = p * f + 2.4163084e-1f;
    p = p * f + 6.9296303e-1f;
    p = p * f + 1.0f;
    return (vf)_mm512_scalef_ps((__m512)p, n);
}

/* Softmax step for one query row over a chunk's raw scores (n live keys; the scale applied
 * here): updates m and l, writes the weights as bf16 to p, returns the correction for the
 * row's accumulator. */
static inline float amx_softmax_row(const float *s, int64_t n, float scale, float *m, float *l,
                                    uint16_t *p) {
    vf sc[KC / VL], top = (vf){0} + NEG;
    for (int u = 0; u < KC / VL; u++) {
        memcpy(&sc[u], s + u * VL, sizeof sc[u]);
        if (n < KC) sc[u] = vsel(lanes_below(n - u * VL), sc[u], (vf){0} + NEG);
        top = vsel(sc[u] > top, sc[u], top);
    }
    float mx = hmax(top) * scale;
    mx = mx > *m ? mx : *m;
    const float c = scale * 1.44269504f, d = mx * 1.44269504f;
    vf total = (vf){0};
    for (int u = 0; u < KC / VL; u++) {
        sc[u] = exp2_bf16(sc[u] * c - d);
        total += sc[u];
    }
    const float corr = mx == *m ? 1.0f : expf(*m - mx);
    *l = *l * corr + hsum(total);
    *m = mx;
    for (int u = 0; u < KC / VL; u += 2) {
        __m512i both = (__m512i)_mm512_cvtne2ps_pbh((__m512)sc[u + 1], (__m512)sc[u]);
        _mm512_storeu_si512(p + u * VL, both);
    }
    return corr;
}

/* O[16 rows][D] (fp32) = O * corr + P V, P the block's bf16 weights [16][KC]. */
static void amx_pv(const uint16_t *p, const uint16_t *vp, int64_t D, float *tmp, float *o,
                   const float *corr, int live) {
    for (int64_t cg = 0; cg < D / 16; cg += 4) {
        const int64_t nc = D / 16 - cg < 4 ? D / 16 - cg : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kp = 0; kp < KC; kp += 32) {
            const uint16_t *b = vp + ((kp / 2) * D + cg * 16) * 2;
            _tile_loadd(4, p + kp, KC * 2);
            DP_INTO(0, b, D * 4);
            DP_INTO(1, b + 32, D * 4);
            if (nc > 2) DP_INTO(2, b + 64, D * 4);
            if (nc > 3) DP_INTO(3, b + 96, D * 4);
        }
        _tile_stored(0, tmp + cg * 16, D * 4);
        _tile_stored(1, tmp + cg * 16 + 16, D * 4);
        if (nc > 2) _tile_stored(2, tmp + cg * 16 + 32, D * 4);
        if (nc > 3) _tile_stored(3, tmp + cg * 16 + 48, D * 4);
    }
    for (int i = 0; i < live; i++)
        for (int64_t c = 0; c < D; c += VL) {
            vf a, t;
            memcpy(&a, o + i * D + c, sizeof a);
            memcpy(&t, tmp + i * D + c, sizeof t);
            a = a * corr[i] + t;
            memcpy(o + i * D + c, &a, sizeof a);
        }
}

/* The tile pass of tile_fn's contract for bf16 q and caches, on AMX, in this thread's
 * scratch buffer; returns -1 (nothing done) when out of memory. */
static int tile_amx(const uint16_t *q, int64_t q_st, int64_t q_sh, int64_t t0, int64_t rows,
                    int64_t g, int64_t kvh, const uint16_t *kc, const uint16_t *vc,
                    int64_t head_base, const int32_t *table, int64_t keys, float *st,
                    int64_t st_rows, int64_t heads, int64_t bs, float scale, int64_t D) {
    const int64_t R = rows * g, Rp = (R + 15) & ~(int64_t)15;
    const size_t qb_n = Rp * D * 2, o_n = Rp * D * 4, kt_n = D * KC * 2, vp_n = KC * D * 2;
    const size_t s_n = 16 * KC * 4, p_n = 16 * KC * 2, tmp_n = 16 * D * 4, ml_n = Rp * 8;
    char *mem = thread_scratch(qb_n + o_n + kt_n + vp_n + s_n + p_n + tmp_n + ml_n + 64);
    if (!mem) return -1;
    uint16_t *qb = (uint16_t *)mem, *vp = (uint16_t *)(mem + qb_n + o_n + kt_n);
    float *o = (float *)(mem + qb_n), *s = (float *)(mem + qb_n + o_n + kt_n + vp_n);
    uint32_t *kt = (uint32_t *)(mem + qb_n + o_n);
    uint16_t *p = (uint16_t *)((char *)s + s_n);
    float *tmp = (float *)((char *)p + p_n), *m = (float *)((char *)tmp + tmp_n), *l = m + Rp;
    memset(qb, 0, qb_n);
    memset(o, 0, o_n);
    memset(p, 0, p_n);
    for (int64_t i = 0; i < R; i++) {
        memcpy(qb + i * D, q + (t0 + i / g) * q_st + (kvh * g + i % g) * q_sh, D * 2);
        m[i] = NEG;
        l[i] = 0.0f;
    }
    amx_configure();
    for (int64_t start = 0; start < keys; start += KC) {
        const int64_t n = keys - start < KC ? keys - start : KC;
        amx_chunk(kc, vc, head_base, table, start, n, bs, D, kt, vp);
        for (int64_t b = 0; b < R; b += 16) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kk = 0; kk < D; kk += 32) {
                const uint32_t *k = kt + (kk / 2) * KC;
                _tile_loadd(4, qb + b * D + kk, D * 2);
                DP_INTO(0, k, KC * 4);
                DP_INTO(1, k + 16, KC * 4);
                DP_INTO(2, k + 32, KC * 4);
                DP_INTO(3, k + 48, KC * 4);
            }
            _tile_stored(0, s, KC * 4);
            _tile_stored(1, s + 16, KC * 4);
            _tile_stored(2, s + 32, KC * 4);
            _tile_stored(3, s + 48, KC * 4);
            const int live = R - b < 16 ? (int)(R - b) : 16;
            float corr[16];
            for (int i = 0; i < live; i++)
                corr[i] = amx_softmax_row(s + i * KC, n, scale, &m[b + i], &l[b + i], p + i * KC);
            amx_pv(p, vp, D, tmp, o + b * D, corr, live);
        }
    }
    for (int64_t i = 0; i < R; i++) {
        const int64_t at = (t0 + i / g) * heads + kvh * g + i % g;
        st[at] = m[i];
        st[st_rows + at] = l[i];
        memcpy(st + 2 * st_rows + at * D, o + i * D, D * 4);
    }
    return 0;
}
