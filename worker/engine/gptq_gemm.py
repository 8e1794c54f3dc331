"""x @ W^T straight from GPTQ's packed int4 weights (the layout gptq_dequant.py describes), by
the fused C kernel csrc/gptq_gemm.c: each thread dequantizes a slice of output columns into a
cache-resident tile once and streams every row of x through it, so the weights are never dense
in memory and no matmul library repacks them per call (dequantize-then-dense pays both).
Linears of one input run side by side in one call, with act-order's column gather in it.
"""

from __future__ import annotations

import ctypes

import torch

from worker.engine import native
from worker.engine.gptq_dequant import block_n

MAX_LAYERS = 16  # linears one call takes (csrc/gptq_gemm.c)
GEMV_ROWS = 8  # fewer rows go straight from the codes, no tiles (csrc/gptq_gemm.c)


def available() -> bool:
    """Whether the compiled kernel runs this CPU's packed layout."""
    lib, bn = native.library(), block_n()
    return lib is not None and bn is not None and bool(lib.inferq_gemm_int4_supports(bn))


class Int4Gemm:
    """GPTQ linears of one input (packed int4 weights and bf16 (scale, offset) pairs each, one
    group size) as one [rows, sum of outputs] product; `gather` (int32 [in]): the packed
    weights' act-order, applied to x's columns. Requires `available()`; the tensors must
    outlive it (their pointers are taken once)."""

    def __init__(
        self,
        weights: list[tuple[torch.Tensor, torch.Tensor]],
        group: int,
        gather: torch.Tensor | None = None,
    ) -> None:
        assert 0 < len(weights) <= MAX_LAYERS and available()
        self.in_features = weights[0][0].shape[1] * 2
        outs = [sz.shape[1] for _, sz in weights]
        for packed, sz in weights:
            assert packed.is_contiguous() and sz.is_contiguous() and sz.dtype == torch.bfloat16
            assert packed.shape[1] * 2 == self.in_features
        assert gather is None or (gather.dtype == torch.int32 and gather.is_contiguous())
        self.out_features, self.group, self.gather = sum(outs), group, gather
        self._keep = weights  # the pointers below point into these
        n = len(weights)
        self._packed = (ctypes.c_void_p * n)(*(p.data_ptr() for p, _ in weights))
        self._sz = (ctypes.c_void_p * n)(*(sz.data_ptr() for _, sz in weights))
        self._n = (ctypes.c_int64 * n)(*outs)
        self._gather = None if gather is None else gather.data_ptr()

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [M, outputs] (bf16 or fp32, unit column stride) = x [M, in] (bf16, unit
        column stride) @ W^T, accumulated in fp32."""
        rows = x.shape[0]
        assert x.dtype == torch.bfloat16 and x.stride(1) == 1 and out.stride(1) == 1
        assert out.shape == (rows, self.out_features) and x.shape[1] == self.in_features
        rc = native.library().inferq_gemm_int4(
            x.data_ptr(),
            x.stride(0),
            self._gather,
            len(self._n),
            self._packed,
            self._sz,
            self._n,
            out.data_ptr(),
            out.stride(0),
            rows,
            self.in_features,
            self.group,
            block_n(),
            int(out.dtype == torch.float32),
            torch.get_num_threads(),
        )
        if rc != 0:
            shape = f"{self.in_features}x{self.out_features} group {self.group}"
            raise ValueError(f"int4 GEMM {shape}: past the kernel's limits, or no memory")
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
        x.data_ptr(),
        x.stride(0),
        idx.data_ptr(),
        out.data_ptr(),
        rows,
        len(idx),
        torch.get_num_threads(),
    )
    return out
