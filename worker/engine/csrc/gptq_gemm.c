/* Fused int4 GEMM over GPTQ weights in the int4 kernel's packed layout (worker/engine/
 * gptq_dequant.py describes it): out[M, N] = x[M, K] @ W^T, x and out bf16 (out fp32 with
 * f32out), accumulated in fp32.
 *
 * A task owns half a packed block (bn/2 output columns: one nibble of each packed byte). It
 * dequantizes those columns for all K inputs into a per-thread tile once, then streams every
 * row of x through a register-blocked micro-kernel (MR rows x 2 vectors). The weights never
 * exist dense in memory and no matmul library repacks them per call: the dequantize-then-
 * dense path's two costs. The weights are rounded to bf16 as the int4 kernel rounds them; with
 * AVX-512 BF16 the tile holds them as pairs (k, k+1) for vdpbf16ps, elsewhere as fp32 for FMAs.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>
#include <omp.h>

#include "amx.h"
#include "vec.h"
#define COLS (2 * VL) /* a task's output columns: the micro-kernel's 2 vectors a row */

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define PAIRS 1 /* tile of bf16 pairs, vdpbf16ps */
#define MR 12
#else
#define PAIRS 0
#define MR 6
#endif
#if PAIRS && VL == 16 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define AMX_ROWS 32 /* gptq_amx.h: the pair tile is AMX's B layout, 32 rows at a time */
#else
#define AMX_ROWS 0
#endif

static inline vf splat(float f) { return (vf){0} + f; }
static inline float bf16_f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Weights of VL columns at one input k: codes from VL packed bytes (nibble `shift`),
 * w = s * code + (offset - 8 s) with the group's vectors. */
static inline vf weights(const uint8_t *bytes, int shift, vf s, vf o8) {
#if VL == 16
    vi code = (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
#else
    vi code = (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
#endif
    return __builtin_convertvector((code >> shift) & 15, vf) * s + o8;
}

/* The group's scale and shifted offset vectors for VL columns from (scale, offset) pairs. */
static inline void group_vectors(const uint32_t *so, vf *s, vf *o8) {
    vi v;
    memcpy(&v, so, sizeof v);
    vi lo = v << 16, hi = v & ((vi){0} + (int32_t)0xffff0000u);
    memcpy(s, &lo, sizeof lo);
    vf o;
    memcpy(&o, &hi, sizeof hi);
    *o8 = o - 8.0f * *s;
}

/* A task's tile to fill: columns [c0, c0 + COLS) of packed block b (half h) of a layer. */
typedef struct {
    void *tile;
    const uint8_t *packed;
    const uint32_t *sz;
    int64_t K, N, group, bn, b;
    int h;
} fill_job;

/* Task `task`'s job (layer l's tasks are [first[l], first[l + 1])), into `tile`. */
static fill_job job_at(int64_t task, void *tile, const int64_t *first,
                       const uint8_t *const *packed, const uint32_t *const *sz, const int64_t *n,
                       int64_t K, int64_t group, int64_t bn) {
    int64_t l = 0;
    while (task >= first[l + 1]) l++;
    const int64_t local = task - first[l];
    return (fill_job){tile, packed[l], sz[l], K, n[l], group, bn, local / 2, (int)(local % 2)};
}

/* Dequantize inputs [k0, k1) (k0 even) of a job's columns into its tile. */
static void fill_range(const fill_job *j, int64_t k0, int64_t k1) {
    void *tile = j->tile;
    const uint8_t *packed = j->packed;
    const uint32_t *sz = j->sz;
    const int64_t K = j->K, N = j->N, group = j->group, b = j->b;
    const int64_t half = j->bn / 2, c0 = b * j->bn + j->h * half;
    const int shift = 4 * j->h;
    vf s[2], o8[2];
    for (int q = 0; q < 2; q++) group_vectors(sz + (k0 / group) * N + c0 + q * VL, &s[q], &o8[q]);
#if PAIRS /* words 2i, 2i + 1 of a pair vector from words i, 16 + i of the two rows */
    const __m512i interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
#endif
    for (int64_t k = k0; k < k1; k += 1 + PAIRS) {
        if (k % group == 0)
            for (int q = 0; q < 2; q++) group_vectors(sz + (k / group) * N + c0 + q * VL, &s[q], &o8[q]);
        const uint8_t *p = packed + (b * K + k) * half;
        for (int q = 0; q < 2; q++) {
            vf w0 = weights(p + q * VL, shift, s[q], o8[q]);
#if PAIRS
            vf w1 = weights(p + half + q * VL, shift, s[q], o8[q]);
            __m512i both = (__m512i)_mm512_cvtne2ps_pbh((__m512)w1, (__m512)w0);
            _mm512_store_si512((uint32_t *)tile + (k / 2) * COLS + q * VL,
                               _mm512_permutexvar_epi16(interleave, both));
#else
            const vu u = round_bf16v(w0);
            memcpy((float *)tile + k * COLS + q * VL, &u, sizeof u);
#endif
        }
    }
}

/* rows x (<= MR, a constant once inlined) rows of x times the tile: out[rows, COLS]. */
static inline __attribute__((always_inline)) void micro(const uint16_t *x, int64_t ldx,
                                                        const void *tile, int64_t K, void *out,
                                                        int64_t ldo, int rows, int f32out) {
    vf acc[MR][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = splat(0.0f);
#if PAIRS
    const uint32_t *t = tile;
    for (int64_t k = 0; k < K; k += 2, t += COLS) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512(t), w1 = (__m512bh)_mm512_load_si512(t + VL);
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, x + r * ldx + k, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = (vf)_mm512_dpbf16_ps((__m512)acc[r][0], xb, w0);
            acc[r][1] = (vf)_mm512_dpbf16_ps((__m512)acc[r][1], xb, w1);
        }
    }
#else
    const float *t = tile;
    for (int64_t k = 0; k < K; k++, t += COLS) {
        vf w0, w1;
        memcpy(&w0, t, sizeof w0);
        memcpy(&w1, t + VL, sizeof w1);
        for (int r = 0; r < rows; r++) {
            const vf xv = splat(bf16_f(x[r * ldx + k]));
            acc[r][0] += xv * w0;
            acc[r][1] += xv * w1;
        }
    }
#endif
    for (int r = 0; r < rows; r++) {
        store_row(out, r * ldo, acc[r][0], !f32out);
        store_row(out, r * ldo + VL, acc[r][1], !f32out);
    }
}

/* The micro-kernel for a row count below MR (the last rows of x). */
static void micro_tail(const uint16_t *x, int64_t ldx, const void *tile, int64_t K, void *out,
                       int64_t ldo, int rows, int f32out) {
    switch (rows) {
#define TAIL(n) \
    case n: micro(x, ldx, tile, K, out, ldo, n, f32out); break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5)
#if MR > 6
        TAIL(6) TAIL(7) TAIL(8) TAIL(9) TAIL(10) TAIL(11)
#endif
#undef TAIL
    default: break;
    }
}

/* Rows of x (a constant below GEMV_ROWS once inlined) times a whole packed block (both
 * nibbles: 2 COLS columns, job `j` its first half) straight from the codes, no tile: for
 * decode at low concurrency, where a tile would be filled for a few rows. Per group,
 * sum(code * x) accumulates apart and turns into sum(w * x) = s * it + o8 * sum(x) at the
 * group's end (w = s * code + o8 exactly, not rounded to bf16). With AVX-512 BF16 the codes of
 * inputs k, k+1 become bf16 pairs (small integers: exact) for vdpbf16ps by a table lookup;
 * elsewhere fp32 FMAs. */
#define GEMV_ROWS 8 /* 1-7 rows (up to 7 rows x 4 vectors of group sums in registers) */
#define BV 4 /* vectors a block: 2 per nibble */
#if PAIRS
/* Both nibbles' codes of 16 columns at inputs k (bytes r0) and k + 1 (r1) as bf16 pairs. */
static inline void code_pairs(const uint8_t *r0, const uint8_t *r1, __m512bh *lo, __m512bh *hi) {
    const __m512i lut = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170,
                                         0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
                                         0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80,
                                         0); /* bf16(v) at lane v < 16 */
    const __m128i a = _mm_loadu_si128((const __m128i *)r0), b = _mm_loadu_si128((const __m128i *)r1);
    const __m512i c = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(a, b),
                                                            _mm_unpacklo_epi8(a, b)));
    *lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(c, _mm512_set1_epi16(15)), lut);
    *hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(c, 4), lut);
}
#endif

/* sums[r][g]: the sum of row r of x over group g's inputs. */
static void group_sums(const uint16_t *x, int64_t ldx, int64_t rows, int64_t K, int64_t group,
                       float *sums) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            vf xs = splat(0.0f);
            for (int64_t k = k0; k + VL <= k0 + group; k += VL) xs += load_row(x, r * ldx + k, 1);
            float sum = hsum(xs);
            for (int64_t k = k0 + group / VL * VL; k < k0 + group; k++) sum += bf16_f(x[r * ldx + k]);
            sums[r * (K / group) + k0 / group] = sum;
        }
}

/* The block's columns for `rows` rows of x, `sums` their group_sums. */
static inline __attribute__((always_inline)) void gemv(const fill_job *j, const uint16_t *x,
                                                       int64_t ldx, const float *sums, void *out,
                                                       int64_t ldo, int rows, int f32out) {
    const int64_t K = j->K, N = j->N, group = j->group, half = j->bn / 2, c0 = j->b * j->bn;
    const uint8_t *packed = j->packed + j->b * K * half;
    vf acc[GEMV_ROWS][BV];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < BV; v++) acc[r][v] = splat(0.0f);
    for (int64_t k0 = 0; k0 < K; k0 += group) {
        vf s[BV], o8[BV], g[GEMV_ROWS][BV];
        for (int v = 0; v < BV; v++) {
            group_vectors(j->sz + (k0 / group) * N + c0 + v * VL, &s[v], &o8[v]);
            for (int r = 0; r < rows; r++) g[r][v] = splat(0.0f);
        }
        for (int64_t k = k0; k < k0 + group; k += 2) {
            const uint8_t *p = packed + k * half;
            for (int q = 0; q < 2; q++) { /* vectors q (low nibbles) and 2 + q (high) */
#if PAIRS
                __m512bh w[2];
                code_pairs(p + q * VL, p + half + q * VL, &w[0], &w[1]);
                for (int r = 0; r < rows; r++) {
                    int32_t two;
                    memcpy(&two, x + r * ldx + k, 4);
                    const __m512bh xb = (__m512bh)_mm512_set1_epi32(two);
                    for (int h = 0; h < 2; h++)
                        g[r][2 * h + q] = (vf)_mm512_dpbf16_ps((__m512)g[r][2 * h + q], xb, w[h]);
                }
#else
                for (int h = 0; h < 2; h++) {
                    const vf w0 = weights(p + q * VL, 4 * h, splat(1.0f), splat(0.0f));
                    const vf w1 = weights(p + half + q * VL, 4 * h, splat(1.0f), splat(0.0f));
                    for (int r = 0; r < rows; r++)
                        g[r][2 * h + q] += splat(bf16_f(x[r * ldx + k])) * w0 +
                                           splat(bf16_f(x[r * ldx + k + 1])) * w1;
                }
#endif
            }
        }
        for (int r = 0; r < rows; r++) {
            const float sum = sums[r * (K / group) + k0 / group];
            for (int v = 0; v < BV; v++) acc[r][v] += g[r][v] * s[v] + sum * o8[v];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < BV; v++) store_row(out, r * ldo + v * VL, acc[r][v], !f32out);
}

static void gemv_rows(const fill_job *j, const uint16_t *x, int64_t ldx, const float *sums,
                      void *out, int64_t ldo, int rows, int f32out) {
    switch (rows) {
#define ROWS(n) \
    case n: gemv(j, x, ldx, sums, out, ldo, n, f32out); break;
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7)
#undef ROWS
    default: break;
    }
}

#if AMX_ROWS
#include "gptq_amx.h"
#else /* no tile unit: every row on the vector micro-kernel */
#define AMX_K 1
static inline int64_t amx_rows(const uint16_t *x, int64_t ldx, const void *tile, int64_t K,
                               void *out, int64_t ldo, int64_t M, int f32out,
                               const fill_job *next) {
    (void)x, (void)ldx, (void)tile, (void)K, (void)out, (void)ldo, (void)M, (void)f32out;
    (void)next;
    return 0;
}
#endif

/* Whether this build runs packed block size bn: a task is half a block, 2 vectors wide. */
int inferq_gemm_int4_supports(int64_t bn) { return bn == 2 * COLS; }

/* out[m][j] = x[m][idx[j]] for bf16 rows (x ldx elements a row, out contiguous [M, K]): the
   input columns in act-order's packed order. Call inside a parallel region (omp for). */
static void gather_rows(const uint16_t *x, int64_t ldx, const int32_t *idx, uint16_t *out,
                        int64_t M, int64_t K) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < K; j++) out[m * K + j] = x[m * ldx + idx[j]];
}

/* The calling thread's buffer for a gathered x (kept between calls), NULL when out of memory. */
static uint16_t *gather_buffer(size_t elements) {
    static __thread uint16_t *buf;
    static __thread size_t capacity;
    if (capacity < elements) {
        free(buf);
        buf = malloc(elements * 2);
        capacity = buf ? elements : 0;
    }
    return buf;
}

/* Several GPTQ linears of one input side by side: out[m][c] (ldo elements a row) = sum_k
   x[m][k] W[c][k], layer l's columns after those of layers < l; its W from packed[l]
   [N_l/bn][K][bn/2] and the bf16 (scale, offset) pairs of sz[l] [K/group][N_l] read as uint32.
   With `gather` (int32 [K], act-order) x's columns are taken in that order first.
   Returns -1 for a shape this build cannot run (nothing written) or when out of memory. */
int inferq_gemm_int4(const uint16_t *x, int64_t ldx, const int32_t *gather, int64_t layers,
                     const uint8_t *const *packed, const uint32_t *const *sz, const int64_t *n,
                     void *out, int64_t ldo, int64_t M, int64_t K, int64_t group, int64_t bn,
                     int f32out, int threads) {
    if (!inferq_gemm_int4_supports(bn) || K % 2 || group % 2 || K % group || layers > 16)
        return -1;
    int64_t first[17] = {0}; /* layer l's tasks are [first[l], first[l + 1]) */
    for (int64_t l = 0; l < layers; l++) {
        if (n[l] % bn) return -1;
        first[l + 1] = first[l] + n[l] / COLS;
    }
    const int64_t tile_bytes = K * COLS * 4 / (1 + PAIRS);
    const size_t esize = f32out ? 4 : 2;
    uint16_t *xg = gather ? gather_buffer((size_t)(M * K)) : NULL;
    if (gather && !xg) return -1;
    const uint16_t *xs = gather ? xg : x;
    const int64_t lds = gather ? K : ldx;
    const int amx = AMX_ROWS && M >= AMX_ROWS && K % AMX_K == 0 && amx_ready();
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        if (gather) gather_rows(x, ldx, gather, xg, M, K); /* ends in a barrier */
        const int64_t total = first[layers], nt = omp_get_num_threads(), me = omp_get_thread_num();
        if (M < GEMV_ROWS) { /* straight from the codes, a whole block (2 tasks) at a time */
            const int64_t blocks = total / 2, per = (blocks + nt - 1) / nt;
            const int64_t b1 = (me + 1) * per < blocks ? (me + 1) * per : blocks;
            float sums[GEMV_ROWS * (K / group)]; /* each thread its own: M K adds */
            group_sums(xs, lds, M, K, group, sums);
            for (int64_t blk = me * per; blk < b1; blk++) {
                const fill_job job = job_at(2 * blk, NULL, first, packed, sz, n, K, group, bn);
                gemv_rows(&job, xs, lds, sums, (char *)out + (size_t)(2 * blk * COLS) * esize,
                          ldo, (int)M, f32out);
            }
        } else {
            char *tiles = thread_scratch((size_t)(2 * tile_bytes)); /* this task's, the next */
            if (!tiles) {
#pragma omp atomic write
                failed = 1;
            }
            /* contiguous tasks per thread (as schedule(static)): the next tile is known */
            const int64_t per = (total + nt - 1) / nt, t0 = me * per;
            const int64_t t1 = tiles ? (t0 + per < total ? t0 + per : total) : t0;
            fill_job job[2];
            for (int64_t task = t0, cur = 0; task < t1; task++, cur ^= 1) {
                if (task == t0) {
                    job[cur] = job_at(task, tiles, first, packed, sz, n, K, group, bn);
                    fill_range(&job[cur], 0, K);
                }
                const fill_job *next = NULL;
                if (task + 1 < t1) {
                    job[cur ^ 1] = job_at(task + 1, tiles + (cur ^ 1) * tile_bytes, first, packed,
                                          sz, n, K, group, bn);
                    next = &job[cur ^ 1];
                }
                const void *tile = job[cur].tile;
                char *o = (char *)out + (size_t)(task * COLS) * esize;
                int64_t m = amx ? amx_rows(xs, lds, tile, K, o, ldo, M, f32out, next) : 0;
                if (next && !amx) fill_range(next, 0, K);
                for (; m + MR <= M; m += MR)
                    micro(xs + m * lds, lds, tile, K, o + (size_t)(m * ldo) * esize, ldo, MR,
                          f32out);
                if (m < M)
                    micro_tail(xs + m * lds, lds, tile, K, o + (size_t)(m * ldo) * esize, ldo,
                               (int)(M - m), f32out);
            }
        }
    }
    return failed ? -1 : 0;
}

/* gather_rows on its own (the int4 kernel's act-order input). */
void inferq_gather_columns(const uint16_t *x, int64_t ldx, const int32_t *idx, uint16_t *out,
                           int64_t M, int64_t K, int threads) {
#pragma omp parallel num_threads(threads) if (M * K > 32768)
    gather_rows(x, ldx, idx, out, M, K);
}
