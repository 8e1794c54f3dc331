"""Per-shape GPTQ kernel choice on CPU: the int4 kernel for few rows (decode at low
concurrency), dequantize-then-dense for many, switching at a row count measured per matmul
shape at load time.

Wraps gptqmodel's `TorchAtenLinear` (after its CPU transform): its packed int4 weights,
scales and offsets stay the only copy of the weights (4 bits each); the dense path
dequantizes them per call into a scratch buffer shared by every layer of that shape.

INFERQ_GPTQ_CROSSOVER overrides the measurement: `off` keeps gptqmodel's modules as they
are, an integer N takes the dense path from N rows (1: always, a huge number: never).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker.engine.gptq_dequant import BLOCK_N, dequantize

ENV = "INFERQ_GPTQ_CROSSOVER"
LADDER = (8, 16, 32, 64, 128, 256)  # rows tried at load; dense also wins beyond the last win
NEVER = 1 << 62  # a crossover no step reaches: the int4 kernel always
FALLBACK = 128  # when a measurement is impossible (e.g. its kernel fails)
Shape = tuple[int, int, int]  # in, out, group

_crossovers: dict[Shape, int] = {}
_scratch: dict[tuple[int, int], torch.Tensor] = {}


def scratch(k: int, n: int) -> torch.Tensor:
    """The reused bf16 [k, n] buffer dense-path layers of that shape dequantize into."""
    buf = _scratch.get((k, n))
    if buf is None:
        with torch.inference_mode(False):  # a plain tensor, usable in and out of inference
            buf = _scratch[(k, n)] = torch.empty(k, n, dtype=torch.bfloat16)
    return buf


class DispatchLinear(torch.nn.Module):
    """A GPTQ linear choosing its kernel by row count: int4 below `crossover`, else
    dequantize (into the shared scratch buffer) then a dense bf16 matmul."""

    def __init__(self, inner: torch.nn.Module, crossover: int) -> None:
        super().__init__()
        self.inner = inner
        self.crossover = crossover
        self.in_features, self.out_features = inner.in_features, inner.out_features
        ret_idx = inner.ret_idx.to(torch.int32)
        identity = torch.equal(ret_idx, torch.arange(len(ret_idx), dtype=torch.int32))
        # act-order: packed row j is input column ret_idx[j]; the dequantizer scatters it back
        self.rowmap = None if identity else ret_idx.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows < self.crossover or x.dtype != torch.bfloat16 or x.requires_grad:
            return self.inner(x)
        return F.linear(x, self.dense_weight().t(), self.inner.bias)

    def dense_weight(self) -> torch.Tensor:
        """W^T, bf16 [in, out], in the shared scratch buffer (valid until the next call)."""
        q = self.inner
        out = scratch(self.in_features, self.out_features)
        return dequantize(q.qweight, q.scales_and_zeros, q.group_size, out, self.rowmap)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, crossover={self.crossover}"


def eligible(module: torch.nn.Module) -> bool:
    """A transformed TorchAtenLinear whose packed layout the dequantizer reads."""
    if type(module).__name__ != "TorchAtenLinear" or module.linear_mode != "inference":
        return False
    k, n = module.in_features, module.out_features
    packed, sz = module.qweight, getattr(module, "scales_and_zeros", None)
    return (
        module.bits == 4
        and n % BLOCK_N == 0
        and k % module.group_size == 0
        and packed.dtype == torch.uint8
        and tuple(packed.shape) == (n, k // 2)
        and sz is not None
        and tuple(sz.shape) == (k // module.group_size, n, 2)
        and sz.dtype == torch.bfloat16
        and module.adapter is None
    )


def _best_us(fn: Callable[[], object], repeat: int = 5) -> float:
    """The fastest of `repeat` calls after a warm-up (the minimum shrugs off a shared CPU)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e6


@torch.inference_mode()
def measure_crossover(layer: DispatchLinear, ladder: tuple[int, ...] = LADDER) -> int:
    """The smallest ladder row count from which dequantize + dense beats int4 at every larger
    ladder count; NEVER when int4 wins at the largest."""
    wins = []
    for rows in ladder:
        x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16)
        int4 = _best_us(lambda x=x: layer.inner(x))
        dense = _best_us(lambda x=x: F.linear(x, layer.dense_weight().t()))
        wins.append(dense < int4)
    crossover = NEVER
    for rows, win in zip(reversed(ladder), reversed(wins), strict=True):
        if not win:
            break
        crossover = rows
    return crossover


def crossover_for(layer: DispatchLinear) -> int:
    """The override, else the measured crossover of this layer's shape (once per process)."""
    override = os.environ.get(ENV, "auto").strip().lower()
    if override not in ("", "auto"):
        return int(override)
    shape = (layer.in_features, layer.out_features, layer.inner.group_size)
    if shape not in _crossovers:
        try:
            _crossovers[shape] = measure_crossover(layer)
        except RuntimeError:
            _crossovers[shape] = FALLBACK
    return _crossovers[shape]


def install(model: torch.nn.Module) -> dict[Shape, int]:
    """Wrap every eligible GPTQ linear of `model` (in place); returns the crossover per
    (in, out, group) shape. A no-op with INFERQ_GPTQ_CROSSOVER=off."""
    if os.environ.get(ENV, "").strip().lower() == "off":
        return {}
    chosen: dict[Shape, int] = {}
    targets = [(name, m) for name, m in model.named_modules() if eligible(m)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        layer = DispatchLinear(module, NEVER)
        layer.crossover = crossover_for(layer)
        chosen[(layer.in_features, layer.out_features, module.group_size)] = layer.crossover
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    return chosen
