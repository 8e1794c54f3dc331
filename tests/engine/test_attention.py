"""The two prefill attention paths agree: the fused SDPA kernel (fp32, GPUs) and the batched
matmuls used on CPU in bf16/fp16. Pure tensor tests (no model)."""

from __future__ import annotations

import pytest
import torch

from worker.engine.attention import _prefill_fused, _prefill_matmul

HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2-135M's grouped-query layout


def _case(cached: int, length: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    context = cached + length
    q = torch.randn(HEADS, length, DIM, generator=gen).to(dtype)
    k = torch.randn(KV_HEADS, context, DIM, generator=gen).to(dtype)
    v = torch.randn(KV_HEADS, context, DIM, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize(("cached", "length"), [(0, 1), (0, 37), (304, 1), (304, 65), (16, 120)])
def test_matmul_path_equals_fused_kernel_in_fp32(cached: int, length: int) -> None:
    q, k, v = _case(cached, length, torch.float32, seed=cached + length)
    scale = DIM**-0.5
    fused = _prefill_fused(q, k, v, scale)
    matmul = _prefill_matmul(q, k, v, scale)
    assert matmul.shape == (HEADS, length, DIM)
    torch.testing.assert_close(matmul, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_path_in_half_precision_stays_within_rounding(dtype: torch.dtype) -> None:
    q, k, v = _case(304, 65, dtype, seed=7)
    scale = DIM**-0.5
    reference = _prefill_fused(q.float(), k.float(), v.float(), scale)
    out = _prefill_matmul(q, k, v, scale)
    assert out.dtype == dtype
    err = (out.float() - reference).abs()
    assert err.max() < 0.02 and err.mean() < 0.002, (err.max(), err.mean())


def test_a_query_never_sees_later_tokens() -> None:
    """Changing the keys/values of the last token leaves every earlier query's output alone."""
    q, k, v = _case(32, 20, torch.float32, seed=3)
    for prefill in (_prefill_matmul, _prefill_fused):
        before = prefill(q, k, v, DIM**-0.5)
        k2, v2 = k.clone(), v.clone()
        k2[:, -1], v2[:, -1] = 100.0, -100.0
        after = prefill(q, k2, v2, DIM**-0.5)
        torch.testing.assert_close(after[:, :-1], before[:, :-1])
        assert not torch.allclose(after[:, -1], before[:, -1])
