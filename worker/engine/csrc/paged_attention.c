/* Paged attention on CPU: every query token of a step attends to its own sequence's keys
 * 0..pos straight from the block-laid cache (no gather, no padding, no mask tensors).
 *
 * Work item = (query token, kv head): the G query heads sharing that kv head are scored
 * together, so each key and value row is read once per item. Keys are taken a block at a
 * time with an online softmax (running max and sum), accumulating in fp32. Decodes of
 * sequences sharing a cached prefix run next to each other, so the prefix stays in cache.
 * Rows are handled as 16-float vectors (GCC vector extensions: AVX-512 with -march=native
 * where the CPU has it); the common head sizes and group sizes get unrolled copies.
 *
 * Layouts (elements): q[t * q_st + h * q_sh + i]; cache[(kvh * slots + slot) * D + i] with
 * slot = block * block_size + offset; out[(t * heads + h) * D + i]. Built by
 * worker/engine/native.py with -O3 -march=native -ffast-math -fopenmp.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_BS 256
#define NEG (-1e30f)

typedef float vf __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));

static inline vf load_row(const void *base, int64_t at, int bf16) {
    vf x;
    if (bf16) {
        vh h;
        memcpy(&h, (const uint16_t *)base + at, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        memcpy(&x, &u, sizeof x);
    } else {
        memcpy(&x, (const float *)base + at, sizeof x);
    }
    return x;
}

static inline void store_row(void *base, int64_t at, vf x, int bf16) {
    if (!bf16) {
        memcpy((float *)base + at, &x, sizeof x);
        return;
    }
    vu u;
    memcpy(&u, &x, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even */
    vh h = __builtin_convertvector(u >> 16, vh);
    memcpy((uint16_t *)base + at, &h, sizeof h);
}

#define SHUF __builtin_shufflevector

/* [sum(t[0]), ..., sum(t[15])]: sixteen horizontal sums in four shuffle-and-add levels. */
static inline vf sum16(const vf t[16]) {
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
}

static inline float hsum16(vf x) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += x[i];
    return s;
}

static inline float hmax(vf x) {
    float m = x[0];
    for (int i = 1; i < 16; i++) m = x[i] > m ? x[i] : m;
    return m;
}

typedef int32_t vi __attribute__((vector_size(64)));

static inline vf vsel(vi mask, vf a, vf b) { /* a where mask, else b */
    vi ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    vi r = (ia & mask) | (ib & ~mask);
    vf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* exp on 16 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 (about 2 ulp; the Cephes
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

/* One (token, kv head) item with NV vectors per head row and G query heads per kv head. */
#define ATTEND(NAME, NV, G)                                                                    \
    static void NAME(const void *q, const int64_t q_at[], const void *kc, const void *vc,       \
                     int64_t head_base, const int32_t *table, int32_t ctx, void *out,          \
                     int64_t out_at, int64_t bs, float scale, int bf16) {                      \
        enum { D = 16 * (NV) };                                                                \
        vf qv[G][NV], acc[G][NV];                                                              \
        float s[G][16], m[G], l[G];                                                        \
        for (int j = 0; j < (G); j++) {                                                        \
            for (int c = 0; c < (NV); c++) {                                                   \
                qv[j][c] = load_row(q, q_at[j] + 16 * c, bf16) * scale;                        \
                acc[j][c] = (vf){0};                                                           \
            }                                                                                  \
            m[j] = NEG;                                                                        \
            l[j] = 0.0f;                                                                       \
        }                                                                                      \
        for (int64_t start = 0, n; start < ctx; start += n) { /* chunks of <= 16 keys */      \
            int64_t off = start % bs;                                                          \
            n = ctx - start < 16 ? ctx - start : 16;                                           \
            n = n < bs - off ? n : bs - off;                                                   \
            int64_t first = ((head_base + (int64_t)table[start / bs] * bs) + off) * D;         \
            vf t[G][16];                                                                       \
            for (int64_t x = 0; x < 16; x++) {                                                 \
                vf k[NV];                                                                      \
                for (int c = 0; c < (NV); c++)                                                 \
                    k[c] = x < n ? load_row(kc, first + x * D + 16 * c, bf16) : (vf){0};       \
                for (int j = 0; j < (G); j++) {                                                \
                    t[j][x] = qv[j][0] * k[0];                                                 \
                    for (int c = 1; c < (NV); c++) t[j][x] += qv[j][c] * k[c];                 \
                }                                                                              \
            }                                                                                  \
            for (int j = 0; j < (G); j++) {                                                    \
                vf sc = sum16(t[j]);                                                           \
                for (int64_t x = n; x < 16; x++) sc[x] = NEG;                                  \
                float mx = hmax(sc);                                                           \
                mx = mx > m[j] ? mx : m[j];                                                    \
                vf p = vexp(sc - mx);                                                          \
                float corr = vexp((vf){0} + (m[j] - mx))[0];                                   \
                l[j] = l[j] * corr + hsum16(p);                                                \
                m[j] = mx;                                                                     \
                memcpy(s[j], &p, sizeof p);                                                    \
                for (int c = 0; c < (NV); c++) acc[j][c] *= corr;                              \
            }                                                                                  \
            for (int64_t x = 0; x < n; x++) {                                                  \
                vf v[NV];                                                                      \
                for (int c = 0; c < (NV); c++) v[c] = load_row(vc, first + x * D + 16 * c, bf16); \
                for (int j = 0; j < (G); j++)                                                  \
                    for (int c = 0; c < (NV); c++) acc[j][c] += s[j][x] * v[c];                \
            }                                                                                  \
        }                                                                                      \
        for (int j = 0; j < (G); j++)                                                          \
            for (int c = 0; c < (NV); c++)                                                     \
                store_row(out, out_at + j * D + 16 * c, acc[j][c] / l[j], bf16);              \
    }

typedef void attend_fn(const void *, const int64_t[], const void *, const void *, int64_t,
                       const int32_t *, int32_t, void *, int64_t, int64_t, float, int);

#define FAMILY(NV)                                                                             \
    ATTEND(attend_##NV##_1, NV, 1)                                                             \
    ATTEND(attend_##NV##_2, NV, 2)                                                             \
    ATTEND(attend_##NV##_3, NV, 3)                                                             \
    ATTEND(attend_##NV##_4, NV, 4)                                                             \
    ATTEND(attend_##NV##_5, NV, 5)                                                             \
    ATTEND(attend_##NV##_6, NV, 6)                                                             \
    ATTEND(attend_##NV##_7, NV, 7)                                                             \
    ATTEND(attend_##NV##_8, NV, 8)                                                             \
    static attend_fn *const attend_##NV[9] = {                                                 \
        0, attend_##NV##_1, attend_##NV##_2, attend_##NV##_3, attend_##NV##_4,                 \
        attend_##NV##_5, attend_##NV##_6, attend_##NV##_7, attend_##NV##_8};

FAMILY(2)  /* head size 32 */
FAMILY(4)  /* head size 64 */
FAMILY(8)  /* head size 128 */

/* The kernel for a head size and group size, or 0 where there is none (the caller then keeps
 * its torch path). */
static attend_fn *pick(int64_t d, int64_t g) {
    if (g < 1 || g > 8) return 0;
    switch (d) {
        case 32: return attend_2[g];
        case 64: return attend_4[g];
        case 128: return attend_8[g];
        default: return 0;
    }
}

int inferq_paged_attention_supports(int64_t d, int64_t g, int64_t bs) {
    return pick(d, g) != 0 && bs >= 1 && bs <= MAX_BS;
}

/* Returns 0, or -1 for sizes `inferq_paged_attention_supports` refuses. */
int inferq_paged_attention(const void *q, int64_t q_st, int64_t q_sh, const void *k_cache,
                           const void *v_cache, int64_t slots, const int32_t *block_tables,
                           int64_t max_blocks, const int32_t *seq_of, const int32_t *ctx_len,
                           void *out, int64_t tokens, int64_t heads, int64_t kv_heads,
                           int64_t d, int64_t bs, float scale, int bf16, int threads) {
    int64_t g = heads / kv_heads;
    attend_fn *fn = pick(d, g);
    if (fn == 0 || g * kv_heads != heads || bs < 1 || bs > MAX_BS) return -1;
    int64_t items = tokens * kv_heads;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
    for (int64_t it = 0; it < items; it++) {
        int64_t t = it / kv_heads, kvh = it % kv_heads, q_at[8];
        for (int64_t j = 0; j < g; j++) q_at[j] = t * q_st + (kvh * g + j) * q_sh;
        const int32_t *table = block_tables + (int64_t)seq_of[t] * max_blocks;
        fn(q, q_at, k_cache, v_cache, kvh * slots, table, ctx_len[t], out,
           (t * heads + kvh * g) * d, bs, scale, bf16);
    }
    return 0;
}
