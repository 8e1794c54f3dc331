/* Paged attention on CPU: every query token of a step attends to its own sequence's keys
 * 0..pos straight from the block-laid cache (no gather, no padding, no mask tensors).
 *
 * Two passes, both over keys in chunks of up to VL with an online softmax (running max and
 * sum) accumulating in fp32, the G query heads that share a kv head scored together:
 * 1. tiles: up to TILE_ROWS consecutive tokens that all see the same leading keys (a prefill
 *    segment's cached prefix, or the system prompt a group of decodes shares) go over those
 *    keys together: each chunk of keys is transposed once and serves every row of the tile.
 *    The softmax state (max, sum, accumulator) is left in `state`.
 * 2. tokens: each (token, kv head) continues from where its tile stopped (or from key 0) over
 *    its own remaining keys, and writes the output.
 * Rows are VL-float vectors, VL the machine's register width (GCC vector extensions with
 * -march=native: 16 with AVX-512, else 8; GCC splits wider vectors badly, through the stack);
 * the common head sizes and group sizes get unrolled copies.
 *
 * Layouts (elements): q[t * q_st + h * q_sh + i]; cache[(kvh * slots + slot) * D + i] with
 * slot = block * block_size + offset; out[(t * heads + h) * D + i]. Built by
 * worker/engine/native.py with -O3 -march=native -ffast-math -fopenmp.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BS 256
#define TILE_ROWS 64
#define NEG (-1e30f)
#include "vec.h"

#define SHUF __builtin_shufflevector

/* [sum(t[0]), ..., sum(t[VL - 1])]: VL horizontal sums in log2(VL) shuffle-and-add levels. */
static inline vf sumv(const vf t[VL]) {
#if VL == 8
    vf a[4], b[2];
    for (int i = 0; i < 4; i++)
        a[i] = SHUF(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
               SHUF(t[2 * i], t[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++)
        b[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
               SHUF(a[2 * i], a[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return SHUF(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) + SHUF(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
#else
    vf a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = SHUF(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUF(t[2 * i], t[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                    30, 31);
    for (int i = 0; i < 4; i++)
        b[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26,
                    27) +
               SHUF(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                    31);
    for (int i = 0; i < 2; i++)
        c[i] = SHUF(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28,
                    29) +
               SHUF(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                    31);
    return SHUF(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUF(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#endif
}

static inline float hmax(vf x) {
    float m = x[0];
    for (int i = 1; i < VL; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static inline vf vsel(vi mask, vf a, vf b) { /* a where mask, else b */
    vi ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    vi r = (ia & mask) | (ib & ~mask);
    vf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* exp on VL lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 (about 2 ulp; the Cephes
 * expf polynomial). Lanes at or below -87 give about 1e-38, never inf or NaN. */
static inline vf vexp(vf x) {
    const vf lo = (vf){0} - 87.0f, hi = (vf){0} + 88.0f;
    x = vsel(x < lo, lo, x);
    x = vsel(x > hi, hi, x);
    vf fx = x * 1.44269504088896341f + 0.5f;
    vf n = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
    n += __builtin_convertvector(n > fx, vf); /* floor: -1 where truncation rounded up */
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = 1.9875691500E-4f * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* Chunk of up to VL keys starting at key `start`: its first cache row and its length. */
static inline int64_t chunk(const int32_t *table, int64_t head_base, int64_t start, int64_t end,
                            int64_t bs, int64_t d, int64_t *first) {
    int64_t off = start % bs, n = end - start < VL ? end - start : VL;
    *first = (head_base + (int64_t)table[start / bs] * bs + off) * d;
    return n < bs - off ? n : bs - off;
}

static inline vi lanes_below(int64_t n) {
    vi lane;
    for (int i = 0; i < VL; i++) lane[i] = i;
    return lane < (int32_t)n;
}

/* Online softmax step for one query row over a chunk's scores `sc` (lanes past the chunk
 * already masked): updates max and sum, returns the chunk's weights, rescales the
 * accumulator's NV vectors by the correction. */
static inline vf softmax_step(vf sc, float *m, float *l, vf *acc, int nv) {
    float mx = hmax(sc);
    mx = mx > *m ? mx : *m;
    vf p = vexp(sc - mx);
    float corr = expf(*m - mx);
    *l = *l * corr + hsum(p);
    *m = mx;
    for (int c = 0; c < nv; c++) acc[c] *= corr;
    return p;
}

/* Asks for the cache lines of `count` elements from `at` (a chunk's contiguous key rows). */
static inline void prefetch_chunk(const void *base, int64_t at, int64_t count, int bf16) {
    const char *p = (const char *)base + at * (bf16 ? 2 : 4);
    for (int64_t b = 0; b < count * (bf16 ? 2 : 4); b += 64) __builtin_prefetch(p + b);
}

/* Pass 2: one (token, kv head) over keys [from, ctx), from the tile's state when from > 0;
 * else over keys [lo, ctx) (a sliding window's first key, or 0) from a fresh state. */
#define ATTEND(NAME, NV, G)                                                                    \
    static void NAME(const void *q, const int64_t q_at[], const void *kc, const void *vc,       \
                     int64_t head_base, const int32_t *table, int64_t from, int64_t lo,        \
                     int64_t ctx, const float *st, int64_t st_rows, int64_t st_at, void *out,               \
                     int64_t out_at, int64_t bs, float scale, int bf16) {                      \
        enum { D = VL * (NV) };                                                                \
        vf qv[G][NV], acc[G][NV];                                                              \
        float s[G][VL], m[G], l[G];                                                            \
        for (int j = 0; j < (G); j++) {                                                        \
            m[j] = from ? st[st_at + j] : NEG;                                                 \
            l[j] = from ? st[st_rows + st_at + j] : 0.0f;                                      \
            for (int c = 0; c < (NV); c++) {                                                   \
                qv[j][c] = load_row(q, q_at[j] + VL * c, 0 + bf16) * scale;                    \
                acc[j][c] = from ? load_row(st, 2 * st_rows + (st_at + j) * D + VL * c, 0)      \
                                 : (vf){0};                                                    \
            }                                                                                  \
        }                                                                                      \
        for (int64_t start = from ? from : lo, n, first; start < ctx; start += n) {            \
            n = chunk(table, head_base, start, ctx, bs, D, &first);                            \
            prefetch_chunk(vc, first, n * D, bf16);                                            \
            if (start + n < ctx) {                                                             \
                int64_t next;                                                                  \
                int64_t m = chunk(table, head_base, start + n, ctx, bs, D, &next);             \
                prefetch_chunk(kc, next, m * D, bf16);                                         \
            }                                                                                  \
            vf t[G][VL];                                                                       \
            for (int64_t x = 0; x < VL; x++) {                                                 \
                vf k[NV];                                                                      \
                for (int c = 0; c < (NV); c++)                                                 \
                    k[c] = x < n ? load_row(kc, first + x * D + VL * c, bf16) : (vf){0};       \
                for (int j = 0; j < (G); j++) {                                                \
                    t[j][x] = qv[j][0] * k[0];                                                 \
                    for (int c = 1; c < (NV); c++) t[j][x] += qv[j][c] * k[c];                 \
                }                                                                              \
            }                                                                                  \
            vi live = lanes_below(n);                                                          \
            for (int j = 0; j < (G); j++) {                                                    \
                vf p = softmax_step(vsel(live, sumv(t[j]), (vf){0} + NEG), &m[j], &l[j],      \
                                    acc[j], NV);                                               \
                memcpy(s[j], &p, sizeof p);                                                    \
            }                                                                                  \
            for (int64_t x = 0; x < n; x++) {                                                  \
                vf v[NV];                                                                      \
                for (int c = 0; c < (NV); c++) v[c] = load_row(vc, first + x * D + VL * c, bf16); \
                for (int j = 0; j < (G); j++)                                                  \
                    for (int c = 0; c < (NV); c++) acc[j][c] += s[j][x] * v[c];                \
            }                                                                                  \
        }                                                                                      \
        for (int j = 0; j < (G); j++)                                                          \
            for (int c = 0; c < (NV); c++)                                                     \
                store_row(out, out_at + j * D + VL * c, acc[j][c] / l[j], bf16);               \
    }

/* Pass 1: `rows` consecutive tokens from t0 (G heads each) over keys [0, keys) of one table,
 * SUB chunks (up to VL * SUB = 64 keys) per softmax step. Each chunk of keys is transposed
 * (kT[s][i] = dimension i of chunk s's VL keys) so a score vector is D multiply-adds of a
 * query scalar by a vector, with no horizontal sums. */
#define SUB (64 / VL)

static inline vf krow(const float *x) { /* one transposed key row (VL keys' dimension i) */
    vf r;
    memcpy(&r, x, sizeof r);
    return r;
}
#define TILE(NAME, NV, G)                                                                      \
    static void NAME(const void *q, int64_t q_st, int64_t q_sh, int64_t t0, int64_t rows,       \
                     int64_t kvh, const void *kc, const void *vc, int64_t head_base,           \
                     const int32_t *table, int64_t keys, float *st, int64_t st_rows,           \
                     int64_t heads, int64_t bs, float scale, int bf16) {                       \
        enum { D = VL * (NV) };                                                                \
        float *qf = malloc(sizeof(float) * rows * (G) * D);                                    \
        float kT[SUB][D][VL], pr[SUB * VL];                                                   \
        vf v[SUB * VL][NV];                                                                    \
        for (int64_t r = 0; r < rows; r++)                                                     \
            for (int j = 0; j < (G); j++) {                                                    \
                int64_t at = (t0 + r) * heads + kvh * (G) + j;                                 \
                st[at] = NEG;                                                                  \
                st[st_rows + at] = 0.0f;                                                       \
                memset(st + 2 * st_rows + at * D, 0, sizeof(float) * D);                      \
                for (int c = 0; c < (NV); c++) {                                               \
                    vf x = load_row(q, (t0 + r) * q_st + (kvh * (G) + j) * q_sh + VL * c, bf16) \
                           * scale;                                                            \
                    memcpy(qf + (r * (G) + j) * D + VL * c, &x, sizeof x);                     \
                }                                                                              \
            }                                                                                  \
        for (int64_t start = 0; start < keys;) {                                               \
            int64_t n[SUB], first = 0;                                                         \
            vi live[SUB];                                                                      \
            for (int u = 0; u < SUB; u++) {                                                    \
                n[u] = start < keys ? chunk(table, head_base, start, keys, bs, D, &first) : 0; \
                live[u] = lanes_below(n[u]);                                                   \
                for (int64_t x = 0; x < VL; x++)                                               \
                    for (int c = 0; c < (NV); c++) {                                           \
                        int64_t at = first + x * D + VL * c;                                   \
                        vf k = x < n[u] ? load_row(kc, at, bf16) : (vf){0};                    \
                        v[u * VL + x][c] = x < n[u] ? load_row(vc, at, bf16) : (vf){0};        \
                        for (int i = 0; i < VL; i++) kT[u][VL * c + i][x] = k[i];              \
                    }                                                                          \
                start += n[u];                                                                 \
            }                                                                                  \
            for (int64_t r = 0; r < rows; r++)                                                 \
                for (int j = 0; j < (G); j++) {                                                \
                    const float *qr = qf + (r * (G) + j) * D;                                  \
                    vf sc[SUB];                                                                \
                    for (int u = 0; u < SUB; u++) sc[u] = qr[0] * krow(kT[u][0]);              \
                    for (int i = 1; i < D; i++)                                                \
                        for (int u = 0; u < SUB; u++) sc[u] += qr[i] * krow(kT[u][i]);         \
                    vf top = (vf){0} + NEG;                                                    \
                    for (int u = 0; u < SUB; u++) {                                            \
                        sc[u] = vsel(live[u], sc[u], (vf){0} + NEG);                           \
                        top = vsel(sc[u] > top, sc[u], top);                                   \
                    }                                                                          \
                    int64_t at = (t0 + r) * heads + kvh * (G) + j;                             \
                    float *m = st + at, *l = st + st_rows + at, mx = hmax(top);                \
                    mx = mx > *m ? mx : *m;                                                    \
                    vf total = (vf){0};                                                        \
                    for (int u = 0; u < SUB; u++) {                                            \
                        sc[u] = vexp(sc[u] - mx);                                              \
                        total += sc[u];                                                        \
                    }                                                                          \
                    vf acc[NV];                                                                \
                    memcpy(acc, st + 2 * st_rows + at * D, sizeof acc);                        \
                    if (mx != *m) {                                                            \
                        float corr = expf(*m - mx);                                            \
                        *l *= corr;                                                            \
                        for (int c = 0; c < (NV); c++) acc[c] *= corr;                         \
                    }                                                                          \
                    *l += hsum(total);                                                       \
                    *m = mx;                                                                   \
                    memcpy(pr, sc, sizeof pr); /* scalars to broadcast, not lanes to extract */ \
                    for (int u = 0; u < SUB; u++)                                              \
                        for (int64_t x = 0; x < n[u]; x++)                                     \
                            for (int c = 0; c < (NV); c++)                                     \
                                acc[c] += pr[u * VL + x] * v[u * VL + x][c];                   \
                    memcpy(st + 2 * st_rows + at * D, acc, sizeof acc);                        \
                }                                                                              \
        }                                                                                      \
        free(qf);                                                                              \
    }

#if VL == 16 && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "attention_bf16.h" /* the tile pass in bf16 pairs, on AMX tiles where there are */
#define BF16_TILES 1
#else
#define BF16_TILES 0
#endif

typedef void attend_fn(const void *, const int64_t[], const void *, const void *, int64_t,
                       const int32_t *, int64_t, int64_t, int64_t, const float *, int64_t, int64_t, void *,
                       int64_t, int64_t, float, int);
typedef void tile_fn(const void *, int64_t, int64_t, int64_t, int64_t, int64_t, const void *,
                     const void *, int64_t, const int32_t *, int64_t, float *, int64_t, int64_t,
                     int64_t, float, int);

typedef struct {
    attend_fn *attend;
    tile_fn *tile;
} kernels;

#define PAIR(NV, G) ATTEND(attend_##NV##_##G, NV, G) TILE(tile_##NV##_##G, NV, G)
#define ENTRY(NV, G) {attend_##NV##_##G, tile_##NV##_##G}
#define FAMILY(NV)                                                                             \
    PAIR(NV, 1) PAIR(NV, 2) PAIR(NV, 3) PAIR(NV, 4) PAIR(NV, 5) PAIR(NV, 6) PAIR(NV, 7)         \
    PAIR(NV, 8) static const kernels family_##NV[9] = {                                        \
        {0, 0},       ENTRY(NV, 1), ENTRY(NV, 2), ENTRY(NV, 3), ENTRY(NV, 4),                   \
        ENTRY(NV, 5), ENTRY(NV, 6), ENTRY(NV, 7), ENTRY(NV, 8)};

#if VL == 16 /* head sizes 32, 64 and 128 */
FAMILY(2) FAMILY(4) FAMILY(8)
#define HEADS_32 family_2
#define HEADS_64 family_4
#define HEADS_128 family_8
#else
FAMILY(4) FAMILY(8) FAMILY(16)
#define HEADS_32 family_4
#define HEADS_64 family_8
#define HEADS_128 family_16
#endif

/* The kernels for a head size and group size; {0, 0} where there are none. */
static kernels pick(int64_t d, int64_t g) {
    kernels none = {0, 0};
    if (g < 1 || g > 8) return none;
    switch (d) {
        case 32: return HEADS_32[g];
        case 64: return HEADS_64[g];
        case 128: return HEADS_128[g];
        default: return none;
    }
}

int inferq_paged_attention_supports(int64_t d, int64_t g, int64_t bs) {
    return pick(d, g).attend != 0 && bs >= 1 && bs <= MAX_BS;
}

/* Returns 0, or -1 for sizes `inferq_paged_attention_supports` refuses. Tile i covers tokens
 * [tile_first[i], tile_first[i] + tile_rows[i]) over keys [0, tile_keys[i]) of table row tile_seq[i];
 * key_from[t] is where token t's own pass starts (its tile's keys, or 0). `key_lo` (NULL, or
 * with no tiles): token t's first key, for a sliding window. `state` holds
 * tokens * heads * (D + 2) floats when there are tiles. */
int inferq_paged_attention(const void *q, int64_t q_st, int64_t q_sh, const void *k_cache,
                           const void *v_cache, int64_t slots, const int32_t *block_tables,
                           int64_t max_blocks, const int32_t *seq_of, const int32_t *ctx_len,
                           const int32_t *key_from, const int32_t *key_lo, int64_t n_tiles, const int32_t *tile_first,
                           const int32_t *tile_rows,
                           const int32_t *tile_seq, const int32_t *tile_keys, float *state,
                           void *out, int64_t tokens, int64_t heads, int64_t kv_heads,
                           int64_t d, int64_t bs, float scale, int bf16, int threads) {
    int64_t g = heads / kv_heads, st_rows = tokens * heads;
    kernels fn = pick(d, g);
    if (fn.attend == 0 || g * kv_heads != heads || bs < 1 || bs > MAX_BS) return -1;
    if (key_lo && n_tiles) return -1;
    for (int64_t i = 0; i < n_tiles; i++)
        if (tile_rows[i] > TILE_ROWS || tile_rows[i] < 1) return -1;
#if BF16_TILES
    const int pairs = bf16 && (d == 32 || d == 64 || d == 128);
    const int amx = pairs && TILE_UNIT && amx_ready();
#endif
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_tiles * kv_heads; it++) {
            int64_t i = it / kv_heads, kvh = it % kv_heads;
#if BF16_TILES
            if (pairs && !tile_bf16(q, q_st, q_sh, tile_first[i], tile_rows[i], g, kvh, k_cache,
                                    v_cache, kvh * slots,
                                    block_tables + (int64_t)tile_seq[i] * max_blocks,
                                    tile_keys[i], state, st_rows, heads, bs, scale, d, amx))
                continue;
#endif
            fn.tile(q, q_st, q_sh, tile_first[i], tile_rows[i], kvh,
                    k_cache, v_cache, kvh * slots,
                    block_tables + (int64_t)tile_seq[i] * max_blocks, tile_keys[i], state,
                    st_rows, heads, bs, scale, bf16);
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t it = 0; it < tokens * kv_heads; it++) {
            int64_t t = it / kv_heads, kvh = it % kv_heads, q_at[8];
            for (int64_t j = 0; j < g; j++) q_at[j] = t * q_st + (kvh * g + j) * q_sh;
            fn.attend(q, q_at, k_cache, v_cache, kvh * slots,
                      block_tables + (int64_t)seq_of[t] * max_blocks, key_from[t],
                      key_lo ? key_lo[t] : 0, ctx_len[t],
                      state, st_rows, t * heads + kvh * g, out, (t * heads + kvh * g) * d, bs,
                      scale, bf16);
        }
    }
    return 0;
}
