/* AMX tiles (Sapphire Rapids and later) for the kernels that use them: every tile 16 rows of
 * 64 bytes (16 fp32 accumulators, 32 bf16 inputs or 16 bf16 pairs). Where the compiler does
 * not target AMX-BF16 (-march=native on a CPU without it), amx_ready() is 0 and nothing else
 * is defined. */
#ifndef INFERQ_AMX_H
#define INFERQ_AMX_H
#if !(defined(__AMX_TILE__) && defined(__AMX_BF16__))
static inline int amx_ready(void) { return 0; }
#else
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Whether this process may use AMX tiles (Linux grants it on request, once per process). */
static int amx_ready(void) {
    static int state; /* 0 unknown, 1 yes, -1 no */
    if (!state) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? -1 : 1;
    return state > 0;
}

/* Loads the shapes (palette 1), per call: oneDNN's AMX kernels run on the same threads with
   configurations of their own. */
static inline void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((packed, aligned(64))) cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}

#endif
#endif
