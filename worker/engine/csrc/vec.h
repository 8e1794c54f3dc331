/* The vector width the C kernels compute in: 16 floats where the CPU has AVX-512, else 8
 * (AVX2), and GCC vector types of that many lanes. Built with -march=native (native.py). */
#ifndef INFERQ_VEC_H
#define INFERQ_VEC_H
#include <stdint.h>

#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif

typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));

#endif
