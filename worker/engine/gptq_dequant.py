"""Dequantize int4 GPTQ weights, kept in `aten._weight_int4pack_mm_for_cpu`'s packed layout,
to a dense bf16 transposed weight, at close to memory speed.

The packed layout (probed from `_convert_weight_to_int4pack_for_cpu(codes, 1)`): uint8
[N/64, K, 32], byte j of (block b, input k) holds the code of output row 64b+j in its low
nibble and of row 64b+32+j in its high nibble. `scales_and_zeros` is bf16 [K/group, N, 2]
(scale, offset) and a weight is `scale * (code - 8) + offset`, computed in fp32.

The fast path is a tiny C function (OpenMP, auto-vectorized with -march=native), built once
with the system C compiler into a cache directory and called through ctypes; where no
compiler works, a torch-ops fallback computes the same values (several times slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

BLOCK_N = 64  # output rows per packed block
C_SOURCE = r"""
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
"""
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def cache_dir() -> Path:
    """Built kernels live in the inferq cache home (INFERQ_HOME, else XDG_CACHE_HOME/inferq;
    the same rule as inferq.settings, which worker.engine may not import)."""
    home = os.environ.get("INFERQ_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (base if home else base / "inferq") / "kernels"


def _machine_key() -> str:
    """What -march=native depends on: the CPU's flags and the compiler."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
    cc = os.environ.get("CC", "gcc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    return "\n".join([C_SOURCE, *FLAGS, platform.machine(), flags, version])


@cache
def c_kernel() -> ctypes.CDLL | None:
    """The compiled dequantizer, built on first use; None where it cannot be built."""
    try:
        digest = hashlib.sha256(_machine_key().encode()).hexdigest()[:16]
        lib = cache_dir() / f"gptq_dequant_{digest}.so"
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                src, built = Path(tmp) / "dequant.c", Path(tmp) / "dequant.so"
                src.write_text(C_SOURCE)
                cc = os.environ.get("CC", "gcc")
                subprocess.run([cc, *FLAGS, str(src), "-o", str(built)], check=True,
                               capture_output=True)  # fmt: skip
                os.replace(built, lib)  # atomic: concurrent builders agree
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError):
        return None
    fn = dll.inferq_dequant_int4
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6
    fn.restype = None
    return dll


def dequantize(
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group: int,
    out: torch.Tensor,
    rowmap: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Write W^T (bf16 [K, n]) into `out` for output blocks `blocks` (default all; n = 64 x
    blocks), input row k at row rowmap[k] when given (int32: undoes act-order)."""
    k = packed.shape[1] * 2
    n = scales_and_zeros.shape[1]
    b0, b1 = blocks or (0, n // BLOCK_N)
    lib = c_kernel()
    if lib is None:
        return _dequantize_torch(packed, scales_and_zeros, group, out, rowmap, (b0, b1))
    assert out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape == (k, (b1 - b0) * 64)
    assert packed.is_contiguous() and scales_and_zeros.is_contiguous()
    assert scales_and_zeros.dtype == torch.bfloat16 and n % BLOCK_N == 0
    lib.inferq_dequant_int4(
        packed.data_ptr(),
        scales_and_zeros.data_ptr(),
        None if rowmap is None else rowmap.data_ptr(),
        out.data_ptr(),
        k, n, group, out.shape[1], b0, b1,
    )  # fmt: skip
    return out


def _dequantize_torch(
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group: int,
    out: torch.Tensor,
    rowmap: torch.Tensor | None,
    blocks: tuple[int, int],
) -> torch.Tensor:
    """The same values with torch ops (no compiler): several full passes over the weights."""
    k, n = packed.shape[1] * 2, scales_and_zeros.shape[1]
    b0, b1 = blocks
    nb = b1 - b0
    codes = packed.view(n // BLOCK_N, k // group, group, 32)[b0:b1]
    codes = torch.cat((codes & 15, codes >> 4), -1).float().sub_(8)  # [nb, G, group, 64]
    sz = scales_and_zeros.view(k // group, n // BLOCK_N, 1, BLOCK_N, 2)[:, b0:b1].transpose(0, 1)
    w = torch.addcmul(sz[..., 1].float(), codes, sz[..., 0].float()).to(torch.bfloat16)
    w = w.reshape(nb, k, BLOCK_N).transpose(0, 1).reshape(k, nb * BLOCK_N)
    if rowmap is None:
        return out.copy_(w)
    return out.index_copy_(0, rowmap.long(), w)
