/* Dequantize int4 GPTQ weights from the int4 kernel's packed layout (worker/engine/
 * gptq_dequant.py describes it) to a dense bf16 or fp32 transposed weight. */
#include <stdint.h>
#include <string.h>

static inline float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f_bf16(float f) {  /* round to nearest even; weights are finite */
    uint32_t u; memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
/* 64 weights of one input row: 32 packed bytes, 64 (scale, offset) pairs. */
static inline void block64(const uint8_t *p, const uint32_t *so, uint16_t *o) {
    const __m512i w16 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i half[2] = {_mm512_and_si512(w16, _mm512_set1_epi16(15)),
                             _mm512_srli_epi16(w16, 4)};
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int h = 0; h < 2; h++) {
        __m512 r[2];
        for (int q = 0; q < 2; q++) {
            __m256i c16 = q ? _mm512_extracti64x4_epi64(half[h], 1)
                            : _mm512_castsi512_si256(half[h]);
            __m512 c = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(c16)),
                                     _mm512_set1_ps(8.0f));
            __m512i v = _mm512_loadu_si512((const void *)(so + 32 * h + 16 * q));
            r[q] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), c,
                                   _mm512_castsi512_ps(_mm512_and_si512(v, high)));
        }
        _mm512_storeu_si512((void *)(o + 32 * h), (__m512i)_mm512_cvtne2ps_pbh(r[1], r[0]));
    }
}
#define HAVE_BLOCK64 1
#endif

/* One weight: the (scale, offset) pair `so` applied to a code. */
static inline float weight(uint32_t so, unsigned code) {
    return bits_f(so << 16) * ((float)code - 8.0f) + bits_f(so & 0xffff0000u);
}

/* The 2 half weights of one input row in one block: half packed bytes, 2 half pairs. */
static inline void block_bf16(const uint8_t *p, const uint32_t *so, uint16_t *o, int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        o[j] = f_bf16(weight(so[j], p[j] & 15));
        o[j + half] = f_bf16(weight(so[j + half], p[j] >> 4));
    }
}

/* The same weights unrounded, as fp32 (for CPUs whose bf16 matmul is slow). */
static inline void block_f32(const uint8_t *p, const uint32_t *so, float *o, int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        o[j] = weight(so[j], p[j] & 15);
        o[j + half] = weight(so[j + half], p[j] >> 4);
    }
}

/* out[rowmap[k] or k][bn (b - b0) + j], b in [b0, b1), from packed [N/bn][K][bn/2] and the
   (scale, offset) bf16 pairs of sz [K/group][N] read as uint32 (scale in the low half);
   out is bf16 (uint16) or, with f32, float, ldo elements a row. */
void inferq_dequant_int4(const uint8_t *packed, const uint32_t *sz, const int32_t *rowmap,
                         void *out, int64_t K, int64_t N, int64_t group, int64_t ldo,
                         int64_t b0, int64_t b1, int64_t bn, int64_t f32) {
    const int64_t half = bn / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < K; k++) {
        const uint32_t *so = sz + (k / group) * N;
        int64_t row = (rowmap ? rowmap[k] : k) * ldo;
        for (int64_t b = b0; b < b1; b++) {
            const uint8_t *p = packed + (b * K + k) * half;
            int64_t at = row + (b - b0) * bn;
            if (f32)
                block_f32(p, so + b * bn, (float *)out + at, half);
#ifdef HAVE_BLOCK64
            else if (bn == 64)
                block64(p, so + b * bn, (uint16_t *)out + at);
#endif
            else
                block_bf16(p, so + b * bn, (uint16_t *)out + at, half);
        }
    }
}
