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
import threading
import time
from collections.abc import Callable

import torch

from worker.engine.gptq_dequant import BLOCK_N, dequantize

ENV = "INFERQ_GPTQ_CROSSOVER"
LADDER = (8, 16, 32, 64, 128, 256)  # rows tried at load; dense also wins beyond the last win
NEVER = 1 << 62  # a crossover no step reaches: the int4 kernel always
FALLBACK = 128  # when a measurement is impossible (e.g. its kernel fails)
Shape = tuple[int, int, int]  # in, out, group

_crossovers: dict[Shape, int] = {}
_local = threading.local()  # per thread: engines stepped on two threads must not share


def scratch(k: int, n: int) -> torch.Tensor:
    """The reused bf16 [k, n] buffer this thread's dense-path layers of that shape
    dequantize into."""
    buffers: dict[tuple[int, int], torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get((k, n))
    if buf is None:
        with torch.inference_mode(False):  # a plain tensor, usable in and out of inference
            buf = buffers[(k, n)] = torch.empty(k, n, dtype=torch.bfloat16)
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
        # act-order: packed row j is input column ret_idx[j]; the int4 kernel wants the input
        # columns gathered in that order, the dequantizer scatters rows back instead
        self.rowmap = None if identity else ret_idx.contiguous()
        self.gather = None if identity else ret_idx.long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.requires_grad:
            return self.inner(x)  # gptqmodel's own path handles the rest
        rows = x.numel() // self.in_features
        if rows < self.crossover:
            out = self.int4(x.reshape(rows, self.in_features))
        else:
            out = x.reshape(rows, self.in_features) @ self.dense_weight()
        if self.inner.bias is not None:
            out += self.inner.bias
        return out.view(*x.shape[:-1], self.out_features)

    def int4(self, x: torch.Tensor) -> torch.Tensor:
        """The int4 kernel on bf16 [rows, in] (what gptqmodel's forward runs, minus its checks)."""
        q = self.inner
        x = x if self.gather is None else x.index_select(1, self.gather)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, q.qweight, q.group_size, q.scales_and_zeros
        )

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


def _best_us(fns: tuple[Callable[[], object], ...], repeat: int = 5) -> list[float]:
    """The fastest of `repeat` calls of each of `fns` after a warm-up, calls interleaved so
    that all see the same load on a shared CPU (the minimum shrugs off preemptions)."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return [b * 1e6 for b in best]


@torch.inference_mode()
def measure_crossover(layer: DispatchLinear, ladder: tuple[int, ...] = LADDER) -> int:
    """The smallest ladder row count where dequantize + dense beats int4, there and at most
    of the larger counts (one noisy point does not decide); NEVER when there is none."""
    wins = []
    for rows in ladder:
        x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16)
        int4, dense = _best_us((lambda x=x: layer.int4(x), lambda x=x: x @ layer.dense_weight()))
        wins.append(dense < int4)
    for i, rows in enumerate(ladder):
        if wins[i] and 2 * sum(wins[i:]) > len(wins) - i:
            return rows
    return NEVER


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
