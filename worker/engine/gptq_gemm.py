"""x @ W^T straight from GPTQ's packed int4 weights (the layout gptq_dequant.py describes), by
the fused C kernel csrc/gptq_gemm.c: each thread dequantizes a slice of output columns into a
cache-resident tile once and streams every row of x through it, so the weights are never dense
in memory and no matmul library repacks them per call (dequantize-then-dense pays both).
Also the act-order column gather both GPTQ kernels need (10-20x torch's index_select on bf16).
"""

from __future__ import annotations

import torch

from worker.engine import native
from worker.engine.gptq_dequant import block_n


def available() -> bool:
    """Whether the compiled kernel runs this CPU's packed layout."""
    lib, bn = native.library(), block_n()
    return lib is not None and bn is not None and bool(lib.inferq_gemm_int4_supports(bn))


def gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """out [M, N] (bf16 or fp32; rows may be strided: a column slice of a wider buffer) =
    x [M, K] (bf16, unit column stride) @ W^T, accumulated in fp32. Requires `available()`."""
    rows, k = x.shape
    n = scales_and_zeros.shape[1]
    assert x.dtype == torch.bfloat16 and x.stride(1) == 1 and packed.shape[1] * 2 == k
    assert out.shape == (rows, n) and out.stride(1) == 1
    assert out.dtype in (torch.bfloat16, torch.float32)
    assert packed.is_contiguous() and scales_and_zeros.is_contiguous()
    lib = native.library()
    assert lib is not None
    rc = lib.inferq_gemm_int4(
        x.data_ptr(), x.stride(0), packed.data_ptr(), scales_and_zeros.data_ptr(),
        out.data_ptr(), out.stride(0), rows, k, n, group, block_n(),
        int(out.dtype == torch.float32), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"int4 GEMM shape past the C kernel's limits: {k}x{n}, group {group}")
    return out


def gather_columns(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[:, idx] for bf16 x [M, K] (unit column stride) and int32 idx [K], as a new
    contiguous tensor."""
    lib = native.library()
    if lib is None or x.dtype != torch.bfloat16 or x.stride(1) != 1:
        return x.index_select(1, idx.long())
    assert idx.dtype == torch.int32 and idx.is_contiguous() and idx.shape == x.shape[1:]
    rows = x.shape[0]
    out = torch.empty(rows, len(idx), dtype=x.dtype)
    lib.inferq_gather_columns(
        x.data_ptr(), x.stride(0), idx.data_ptr(), out.data_ptr(), rows, len(idx),
        torch.get_num_threads(),
    )  # fmt: skip
    return out
