/* The fused int4 GEMM's many-row micro-kernel on AMX (Sapphire Rapids and later): 32 rows of
 * x times a task's 32-column pair tile per pass, on tiles 0-3 (C: 2 x 2 blocks of 16 x 16
 * fp32), 4-5 (A: 16 rows x 32 bf16 of x) and 6-7 (B: 16 pair rows x 16 columns of the tile,
 * which fill_tile lays out exactly as AMX's B wants). Included by gptq_gemm.c when the
 * compiler targets AMX-BF16; rows past the last multiple of 32 go to the vector micro-kernel.
 */
#include "amx.h"

#define AMX_K 32 /* inputs a tdpbf16ps takes */

/* out rows [0, M - M % 32) of a task's columns = x @ tile; returns the rows done. Fills the
   `next` task's tile (when given) on the way, a slice per step: vector work while the tile
   unit multiplies. */
static int64_t amx_rows(const uint16_t *x, int64_t ldx, const void *tile, int64_t K, char *out,
                        int64_t ldo, int64_t M, int f32out, const fill_job *next) {
    const int64_t blocks = M / AMX_ROWS, slice = blocks >= 16 ? 2 : (32 / blocks) & ~1;
    int64_t filled = next ? 0 : K;
    amx_configure();
    const uint32_t *t = tile;
    float acc[AMX_ROWS][COLS] __attribute__((aligned(64)));
    const size_t esize = f32out ? 4 : 2;
    int64_t m = 0;
    for (; m + AMX_ROWS <= M; m += AMX_ROWS) {
        const uint16_t *a = x + m * ldx;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < K; k += AMX_K) {
            _tile_loadd(4, a + k, ldx * 2);
            _tile_loadd(5, a + 16 * ldx + k, ldx * 2);
            _tile_loadd(6, t + (k / 2) * COLS, COLS * 4);
            _tile_loadd(7, t + (k / 2) * COLS + 16, COLS * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            if (filled < K) {
                const int64_t to = filled + slice < K ? filled + slice : K;
                fill_range(next, filled, to);
                filled = to;
            }
        }
        _tile_stored(0, &acc[0][0], COLS * 4);
        _tile_stored(1, &acc[0][16], COLS * 4);
        _tile_stored(2, &acc[16][0], COLS * 4);
        _tile_stored(3, &acc[16][16], COLS * 4);
        for (int r = 0; r < AMX_ROWS; r++) {
            vf lo, hi;
            memcpy(&lo, acc[r], sizeof lo);
            memcpy(&hi, acc[r] + VL, sizeof hi);
            char *o = out + (size_t)((m + r) * ldo) * esize;
            store_row(o, 0, lo, !f32out);
            store_row(o, VL, hi, !f32out);
        }
    }
    if (filled < K) fill_range(next, filled, K);
    return m;
}
