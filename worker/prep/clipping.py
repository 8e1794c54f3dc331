"""GPTQ's clipping search (`mse` > 0), evaluated all at once instead of one shrink step at a time.

gptqmodel 7.6.0's `Quantizer.find_params` tries, per weight row, 80 shrunken ranges of the
row's min/max (p = 1, 0.99, ..., 0.21), each a Python iteration of a dozen small tensor ops;
with static groups it runs once per 32-column group (4,680 calls for the default model) and
once more on every whole weight matrix, whose result the groups overwrite before it is read.
That search was 218 s of a 370 s quantization (bench/gptq_time.py, docs/benchmarks.md).

`fast_clipping_search()` swaps in a `find_params` that computes the same candidates in one
batched tensor (chunked to bound memory) and picks, per row, the first candidate with the
smallest error, as the loop does; `steps` keeps only the first shrink steps (the recipe's
`clip_steps`: on the default model, whose weights come from Q4_1 blocks, 99.99 % of the
ranges the full search picks are within 10 steps of min/max). A whole-matrix call with
groups (more columns than the group size) gets the plain min/max range: the loop's result
there is never read. Every other case
(sym group-less, 2-bit zero-point search, trits, activations) runs gptqmodel's own code.
tests/engine/test_clipping.py checks the scales and zero points equal gptqmodel's, and that a
quantized checkpoint is the same with or without it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

CHUNK_ELEMENTS = 1 << 23  # candidates x rows x columns evaluated per step (32 MiB of fp32)
ALL_STEPS = 80  # gptqmodel's grid: int(maxshrink 0.8 * grid 100)
_lock = threading.Lock()
_steps = ALL_STEPS


def _fast_case(quantizer, weight: bool) -> bool:
    return (
        weight
        and quantizer.perchannel
        and int(quantizer.maxq.item()) > 0
        and not quantizer.requires_groupwise_processing()
        and not quantizer._search_adjacent_zero_points()
    )


def _min_max(quantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row ranges gptqmodel starts from (zero included; all-zero rows get [-1, 1])."""
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1)[0], zeros)
    xmax = torch.maximum(x.max(1)[0], zeros)
    if quantizer.qcfg.sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        negative = xmin < 0
        if torch.any(negative):
            xmin[negative] = -xmax[negative]
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty] = -1
    xmax[empty] = +1
    return xmin, xmax


def _scale_zero(quantizer, xmin, xmax) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (xmax - xmin) / quantizer.maxq
    if quantizer.qcfg.sym:
        return scale, torch.full_like(scale, (quantizer.maxq + 1) / 2)
    return scale, torch.round(-xmin / scale)


def search(quantizer, x: torch.Tensor, xmin, xmax, scale, zero, mse: float):
    """The loop's choice of (scale, zero) per row, evaluated in chunks of shrink steps."""
    steps = min(_steps, int(quantizer.maxshrink * quantizer.grid))
    # the loop multiplies by the Python float 1 - i / grid: the same value, cast to fp32
    shrink = torch.tensor([1 - i / quantizer.grid for i in range(steps)], dtype=torch.float64)
    shrink = shrink.to(device=x.device, dtype=x.dtype)
    rows = x.shape[0]
    best = torch.full([rows], float("inf"), device=x.device)
    choice = torch.full([rows], -1, dtype=torch.long, device=x.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, x.numel()))
    maxq = quantizer.maxq
    for start in range(0, steps, chunk):
        p = shrink[start : start + chunk, None]
        xmin1, xmax1 = p * xmin, p * xmax
        scale1 = (xmax1 - xmin1) / maxq
        zero1 = zero.expand_as(scale1) if quantizer.qcfg.sym else torch.round(-xmin1 / scale1)
        s, z = scale1.unsqueeze(2), zero1.unsqueeze(2)
        q = torch.clamp(torch.round(x / s) + z, 0, maxq)
        q = s * (q - z)
        q -= x
        q.abs_()
        q.pow_(mse)
        err = torch.sum(q, 2).nan_to_num_(nan=float("inf"))
        low, at = err.min(0)  # the first index of the minimum, as the loop's strict `<`
        better = low < best
        best = torch.where(better, low, best)
        choice = torch.where(better, at + start, choice)
    found = choice >= 0
    p = shrink[choice[found]]
    xmin1, xmax1 = p * xmin[found], p * xmax[found]
    scale[found] = (xmax1 - xmin1) / maxq
    if not quantizer.qcfg.sym:
        zero[found] = torch.round(-xmin1 / scale[found])
    return scale, zero


def find_params(quantizer, x: torch.Tensor, weight: bool = False) -> None:
    """`Quantizer.find_params` for weight rows, with the clipping search batched."""
    mse = float(getattr(quantizer.qcfg, "mse", 0.0) or 0.0)
    if not _fast_case(quantizer, weight):
        return _original(quantizer, x, weight=weight)
    quantizer.maxq = quantizer.maxq.to(x.device)
    shape = x.shape
    x = x.flatten(1)
    xmin, xmax = _min_max(quantizer, x)
    scale, zero = _scale_zero(quantizer, xmin, xmax)
    group = int(getattr(quantizer.qcfg, "group_size", -1) or -1)
    whole_matrix = 0 < group < x.shape[1]  # its groups are searched, this result never read
    if mse > 0.0 and not whole_matrix:
        scale, zero = search(quantizer, x, xmin, xmax, scale, zero, mse)
    view = [-1] + [1] * (len(shape) - 1)
    quantizer.scale = scale.reshape(view)
    quantizer.zero = zero.reshape(view)


_original = None


@contextlib.contextmanager
def fast_clipping_search(steps: int = ALL_STEPS) -> Iterator[None]:
    """gptqmodel's Quantizer uses `find_params` above while this is active, trying the first
    `steps` shrink steps (all of gptqmodel's 80 by default)."""
    global _original, _steps
    from gptqmodel.quantization.quantizer import Quantizer

    with _lock:
        saved, saved_steps = Quantizer.find_params, _steps
        if saved is not find_params:  # not already active (nested)
            _original = saved
        Quantizer.find_params, _steps = find_params, steps
    try:
        yield
    finally:
        with _lock:
            Quantizer.find_params, _steps = saved, saved_steps
