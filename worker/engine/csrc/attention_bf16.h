/* Attention's tile pass in bf16 on AVX-512 BF16 (and AMX where there is one): the tile's
 * rows x G query heads (as 16-row blocks) against its shared keys, 64 keys a chunk, with
 * fp32 accumulation and an online softmax. Each chunk of keys is laid out once as bf16 pairs:
 * K as pairs of dimensions per key, V as pairs of keys per dimension, so S = Q K^T and
 * O += P V are dot products of pairs (vdpbf16ps on vectors, tdpbf16ps on AMX tiles). The
 * softmax runs on vectors (P rounded to bf16, as bf16 flash attention does). Leaves the same
 * state as the fp32 tile pass. Included by paged_attention.c after its vector helpers where
 * the compiler targets AVX-512 BF16; bf16 caches and head sizes 32, 64 and 128 only.
 */
#include <immintrin.h>

#include "amx.h" /* amx_ready */

#define KC 64 /* keys a chunk */

/* Keys [start, start + n) of one kv head as the two pair layouts: kt[D/2][KC] (dimension
 * pairs of each key) and vp[KC/2][D] (key pairs of each dimension); zeros past n. */
static void bf16_chunk(const uint16_t *kc, const uint16_t *vc, int64_t head_base,
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
static inline float softmax_row_bf16(const float *s, int64_t n, float scale, float *m, float *l,
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

/* s[r][0, 16 nc) = sum over dimension pairs i of a[r] (bf16 rows, lda elements apart) times
 * b[i] (rows of bf16 pairs, ldb words apart), for 4 rows: 4 rows x nc (2 or 4) vectors. */
static inline __attribute__((always_inline)) void dot4_rows(const uint16_t *a, int64_t lda,
                                                            const uint32_t *b, int64_t pairs,
                                                            int64_t ldb, float *s, int64_t lds,
                                                            int nc) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < pairs; i++, b += ldb) {
        __m512bh w[4];
        for (int c = 0; c < nc; c++) w[c] = (__m512bh)_mm512_loadu_si512(b + c * VL);
        for (int r = 0; r < 4; r++) {
            int32_t two;
            memcpy(&two, a + r * lda + 2 * i, 4);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(two);
            for (int c = 0; c < nc; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x, w[c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(s + r * lds + c * VL, acc[r][c]);
}

/* S [16][KC] for a 16-row block of bf16 queries qb (D each) against the chunk's kt; rows
 * past `live` (up to a multiple of 4) are computed too, and unused. */
static void vec_scores(const uint16_t *qb, const uint32_t *kt, int64_t D, float *s, int live) {
    for (int r = 0; r < live; r += 4) dot4_rows(qb + r * D, D, kt, D / 2, KC, s + r * KC, KC, 4);
}

/* tmp[16 rows][D] (fp32) = P V on vectors, P the block's bf16 weights [16][KC]; rows past
 * `live` (up to a multiple of 4) are computed too, and unused. */
static void vec_pv(const uint16_t *p, const uint16_t *vp, int64_t D, float *tmp, int live) {
    const uint32_t *v2 = (const uint32_t *)vp;
    for (int r = 0; r < live; r += 4)
        if (D == 2 * VL)
            dot4_rows(p + r * KC, KC, v2, KC / 2, D, tmp + r * D, D, 2);
        else
            for (int64_t c0 = 0; c0 < D; c0 += 4 * VL)
                dot4_rows(p + r * KC, KC, v2 + c0, KC / 2, D, tmp + r * D + c0, D, 4);
}

/* o[i] = o[i] * corr[i] + tmp[i] for the block's live rows (D fp32 each). */
static void rescale_add(float *o, const float *tmp, const float *corr, int live, int64_t D) {
    for (int i = 0; i < live; i++)
        for (int64_t c = 0; c < D; c += VL) {
            vf a, t;
            memcpy(&a, o + i * D + c, sizeof a);
            memcpy(&t, tmp + i * D + c, sizeof t);
            a = a * corr[i] + t;
            memcpy(o + i * D + c, &a, sizeof a);
        }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "attention_amx.h" /* amx_scores, amx_pv */
#define TILE_UNIT 1
#else
#define TILE_UNIT 0
#endif

/* The tile pass of tile_fn's contract for bf16 q and caches, on AMX tiles (`amx`) or
 * vectors, in this thread's scratch buffer; returns -1 (nothing done) when out of memory. */
static int tile_bf16(const uint16_t *q, int64_t q_st, int64_t q_sh, int64_t t0, int64_t rows,
                     int64_t g, int64_t kvh, const uint16_t *kc, const uint16_t *vc,
                     int64_t head_base, const int32_t *table, int64_t keys, float *st,
                     int64_t st_rows, int64_t heads, int64_t bs, float scale, int64_t D,
                     int amx) {
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
#if TILE_UNIT
    if (amx) amx_configure();
#else
    (void)amx;
#endif
    for (int64_t start = 0; start < keys; start += KC) {
        const int64_t n = keys - start < KC ? keys - start : KC;
        bf16_chunk(kc, vc, head_base, table, start, n, bs, D, kt, vp);
        for (int64_t b = 0; b < R; b += 16) {
            const int live = R - b < 16 ? (int)(R - b) : 16;
#if TILE_UNIT
            if (amx)
                amx_scores(qb + b * D, kt, D, s);
            else
#endif
                vec_scores(qb + b * D, kt, D, s, live);
            float corr[16];
            for (int i = 0; i < live; i++)
                corr[i] = softmax_row_bf16(s + i * KC, n, scale, &m[b + i], &l[b + i], p + i * KC);
#if TILE_UNIT
            if (amx)
                amx_pv(p, vp, D, tmp);
            else
#endif
                vec_pv(p, vp, D, tmp, live);
            rescale_add(o + b * D, tmp, corr, live, D);
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
