"""Dequantize int4 GPTQ weights, kept in `aten._weight_int4pack_mm_for_cpu`'s packed layout,
to a dense bf16 (or fp32) transposed weight, at close to memory speed.

The packed layout (`_convert_weight_to_int4pack_for_cpu(codes, 1)`; its block B is 64 output
rows where torch's CPU kernels run AVX-512, 32 on AVX2, probed once by `block_n`): uint8
[N/B, K, B/2], byte j of (block b, input k) holds the code of output row Bb+j in its low
nibble and of row Bb+B/2+j in its high nibble. `scales_and_zeros` is bf16 [K/group, N, 2]
(scale, offset) and a weight is `scale * (code - 8) + offset`, computed in fp32 (and rounded
to bf16 for a bf16 output: the int4 kernel's own weights, bit for bit).

The fast path is a C function (csrc/gptq_dequant.c: AVX-512 BF16 for 64-row blocks where the
CPU has it, plain C otherwise; OpenMP), built with the engine's other kernels by native.py; where no
compiler works, a torch-ops fallback computes the same values (several times slower).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from worker.engine import native

BLOCKS = (64, 32)  # the packed block sizes (output rows) this module reads


@functools.cache
def block_n() -> int | None:
    """Output rows per packed block of this CPU's int4 layout; None if it is none we know."""
    n, k = 2 * max(BLOCKS), 4
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator())
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).flatten()
    for bn in BLOCKS:
        lo, hi = codes.view(n // bn, 2, bn // 2, k).unbind(1)  # rows Bb+j, Bb+B/2+j
        if torch.equal(packed, (lo | hi << 4).transpose(1, 2).flatten().to(torch.uint8)):
            return bn
    return None


def c_kernel() -> ctypes.CDLL | None:
    """The compiled dequantizer (csrc/gptq_dequant.c, built with the engine's other C
    kernels); None where they cannot be built."""
    return native.library()


def dequantize(
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group: int,
    out: torch.Tensor,
    rowmap: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Write W^T (bf16 or fp32 [K, n], `out`'s dtype; rows may be strided: a column slice of
    a wider buffer) into `out` for output blocks `blocks` (default all; n = block_n() x blocks),
    input row k at row rowmap[k] when given (int32: undoes act-order)."""
    k = packed.shape[1] * 2
    n = scales_and_zeros.shape[1]
    bn = block_n()
    assert bn is not None and n % bn == 0
    b0, b1 = blocks or (0, n // bn)
    lib = c_kernel()
    if lib is None:
        return _dequantize_torch(packed, scales_and_zeros, group, out, rowmap, (b0, b1))
    f32 = out.dtype == torch.float32
    assert f32 or out.dtype == torch.bfloat16
    assert out.stride(1) == 1 and out.shape == (k, (b1 - b0) * bn)
    assert packed.is_contiguous() and scales_and_zeros.is_contiguous()
    assert scales_and_zeros.dtype == torch.bfloat16
    lib.inferq_dequant_int4(
        packed.data_ptr(),
        scales_and_zeros.data_ptr(),
        None if rowmap is None else rowmap.data_ptr(),
        out.data_ptr(),
        k,
        n,
        group,
        out.stride(0),
        b0,
        b1,
        bn,
        f32,
    )
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
    k, n, bn = packed.shape[1] * 2, scales_and_zeros.shape[1], block_n()
    b0, b1 = blocks
    nb = b1 - b0
    codes = packed.view(n // bn, k // group, group, bn // 2)[b0:b1]
    codes = torch.cat((codes & 15, codes >> 4), -1).float().sub_(8)  # [nb, G, group, bn]
    sz = scales_and_zeros.view(k // group, n // bn, 1, bn, 2)[:, b0:b1].transpose(0, 1)
    w = torch.addcmul(sz[..., 1].float(), codes, sz[..., 0].float()).to(out.dtype)
    w = w.reshape(nb, k, bn).transpose(0, 1).reshape(k, nb * bn)
    if rowmap is None:
        return out.copy_(w)
    return out.index_copy_(0, rowmap.long(), w)
