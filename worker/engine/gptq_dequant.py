"""Dequantize int4 GPTQ weights, kept in `aten._weight_int4pack_mm_for_cpu`'s packed layout,
to a dense bf16 transposed weight, at close to memory speed.

The packed layout (probed from `_convert_weight_to_int4pack_for_cpu(codes, 1)`): uint8
[N/64, K, 32], byte j of (block b, input k) holds the code of output row 64b+j in its low
nibble and of row 64b+32+j in its high nibble. `scales_and_zeros` is bf16 [K/group, N, 2]
(scale, offset) and a weight is `scale * (code - 8) + offset`, computed in fp32.

The fast path is a C function (csrc/gptq_dequant.c: AVX-512 BF16 where the CPU has it,
plain C otherwise; OpenMP), built with the engine's other kernels by native.py; where no
compiler works, a torch-ops fallback computes the same values (several times slower).
"""

from __future__ import annotations

import ctypes

import torch

from worker.engine import native

BLOCK_N = 64  # output rows per packed block


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
