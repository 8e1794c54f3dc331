/* Attention's tile pass on AMX tiles (attention_bf16.h drives it): S = Q K^T and O += P V
 * for a 16-row block on tiles of bf16 pairs, tdpbf16ps accumulating in fp32. Included where
 * the compiler targets AMX-BF16.
 */
#include "amx.h"

/* Tile `c` (0-3) += A (tile 4) x B loaded from `b` (stride bytes) into tile 5. */
#define DP_INTO(c, b, stride)                                                                  \
    do {                                                                                       \
        _tile_loadd(5, b, stride);                                                             \
        _tile_dpbf16ps(c, 4, 5);                                                               \
    } while (0)

/* S [16][KC] (fp32) for a 16-row block of bf16 queries qb (D each) against the chunk's kt. */
static void amx_scores(const uint16_t *qb, const uint32_t *kt, int64_t D, float *s) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kk = 0; kk < D; kk += 32) {
        const uint32_t *k = kt + (kk / 2) * KC;
        _tile_loadd(4, qb + kk, D * 2);
        DP_INTO(0, k, KC * 4);
        DP_INTO(1, k + 16, KC * 4);
        DP_INTO(2, k + 32, KC * 4);
        DP_INTO(3, k + 48, KC * 4);
    }
    _tile_stored(0, s, KC * 4);
    _tile_stored(1, s + 16, KC * 4);
    _tile_stored(2, s + 32, KC * 4);
    _tile_stored(3, s + 48, KC * 4);
}

/* tmp[16 rows][D] (fp32) = P V on tiles, P the block's bf16 weights [16][KC]. */
static void amx_pv(const uint16_t *p, const uint16_t *vp, int64_t D, float *tmp) {
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
}
