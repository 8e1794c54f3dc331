/* The vector width the C kernels compute in: 16 floats where the CPU has AVX-512, else 8
 * (AVX2), GCC vector types of that many lanes, and fp32/bf16 row loads and stores in them.
 * Built with -march=native (native.py). */
#ifndef INFERQ_VEC_H
#define INFERQ_VEC_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif

typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));

/* The sum of x's lanes. */
static inline float hsum(vf x) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += x[i];
    return s;
}

/* x rounded to bf16 (nearest even; x finite), as the upper halves of the lanes' bits. */
static inline vu round_bf16v(vf x) {
    vu u;
    memcpy(&u, &x, sizeof u);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}

/* VL fp32 values from fp32 or (bf16) bf16 elements at `at`. */
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

/* x stored as fp32 or (bf16) bf16 elements at `at`, rounded to nearest even. */
static inline void store_row(void *base, int64_t at, vf x, int bf16) {
    if (!bf16) {
        memcpy((float *)base + at, &x, sizeof x);
        return;
    }
    vh h = __builtin_convertvector(round_bf16v(x) >> 16, vh);
    memcpy((uint16_t *)base + at, &h, sizeof h);
}

/* This thread's scratch buffer of at least `bytes` (64-byte aligned, kept between calls:
   OpenMP's threads persist; one per source file); NULL when out of memory. */
static inline void *thread_scratch(size_t bytes) {
    static __thread void *buf;
    static __thread size_t capacity;
    if (capacity < bytes) {
        free(buf);
        buf = aligned_alloc(64, bytes);
        capacity = buf ? bytes : 0;
    }
    return buf;
}

#endif
