"""The lean forward's fused projections: dense linears side by side as one prepacked matmul,
with half-precision weights widened to fp32 where oneDNN cannot pack them on this CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine import lean

FP32 = torch.float32


def _linears(dtype: torch.dtype) -> list[nn.Linear]:
    torch.manual_seed(0)
    layers = [nn.Linear(96, 64, bias=True), nn.Linear(96, 32, bias=False)]
    return [m.to(dtype) for m in layers]


@pytest.mark.parametrize("widen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_is_its_linears_side_by_side(
    dtype: torch.dtype, widen: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if widen:  # as on a CPU without bf16 packing (AVX2): only fp32 packs
        prepack = lean._prepack
        monkeypatch.setattr(lean, "_prepack", lambda w: prepack(w) if w.dtype == FP32 else None)
    layers = _linears(dtype)
    x = torch.randn(5, 96).to(dtype)
    with torch.inference_mode():
        want = torch.cat([m(x) for m in layers], dim=-1)
        proj = lean._Projection(layers)
        got = proj(x)
    assert got.dtype == dtype and got.shape == (5, 96)
    if torch.backends.mkldnn.is_available() and (widen or dtype == torch.float32):
        assert proj.compute == torch.float32  # packed, in fp32
        assert all(m.weight.numel() == 0 for m in layers)  # the packed weight is the only copy
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def test_kept_weight_stays() -> None:
    """A weight used elsewhere too (the tied embedding) keeps its module copy."""
    layers = _linears(torch.float32)
    lean._Projection(layers, keep=True)
    assert all(m.weight.numel() > 0 for m in layers)
