/* Dequantize int4 GPTQ weights from the int4 kernel's packed layout (worker/engine/
 * gptq_dequant.py describes it) to a dense bf16 transposed weight. */
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
#else
static inline void block64(const uint8_t *p, const uint32_t *so, uint16_t *o) {
    for (int j = 0; j < 32; j++) {
        uint32_t lo = so[j], hi = so[j + 32];
        float c0 = (float)(p[j] & 15) - 8.0f, c1 = (float)(p[j] >> 4) - 8.0f;
        o[j] = f_bf16(bits_f(lo << 16) * c0 + bits_f(lo & 0xffff0000u));
        o[j + 32] = f_bf16(bits_f(hi << 16) * c1 + bits_f(hi & 0xffff0000u));
    }
}
#endif

/* out[rowmap[k] or k][64 (b - b0) + j], b in [b0, b1), from packed [N/64][K][32] and the
   (scale, offset) bf16 pairs of sz [K/group][N] read as uint32 (scale in the low half). */
void inferq_dequant_int4(const uint8_t *packed, const uint32_t *sz, const int32_t *rowmap,
                         uint16_t *out, int64_t K, int64_t N, int64_t group, int64_t ldo,
                         int64_t b0, int64_t b1) {
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < K; k++) {
        const uint32_t *so = sz + (k / group) * N;
        uint16_t *o = out + (rowmap ? rowmap[k] : k) * ldo;
        for (int64_t b = b0; b < b1; b++)
            block64(packed + (b * K + k) * 32, so + b * 64, o + (b - b0) * 64);
    }
}
