"""Per-shape GPTQ kernel choice on CPU: torch's int4 kernel for few rows (decode at low
concurrency), a many-row path from a row count measured per matmul shape at load time.

The many-row path is the fused int4 GEMM (gptq_gemm.py: dequantizes tile by tile in cache)
where it runs here and measures faster at PROBE_ROWS, else dequantize-then-dense: the weights
into a scratch buffer shared by every layer of that shape, then a dense matmul, in bf16 where
oneDNN has native bf16 matmuls, else in fp32 (where no compiler works, or it measures faster).

Wraps gptqmodel's `TorchAtenLinear` (after its CPU transform): its packed int4 weights,
scales and offsets stay the only copy of the weights (4 bits each). `FusedDispatch` runs the
linears of one input (q/k/v, gate/up) as one projection with one output buffer.

EngineConfig.gptq_crossover (INFERQ_GPTQ_CROSSOVER) overrides the crossover: `off` keeps
gptqmodel's modules as they are, an integer N takes the many-row path from N rows (1: always,
a huge number: never). EngineConfig.gptq_many (INFERQ_GPTQ_MANY) picks the many-row path:
`fused`, `dense` or `auto` (measured).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from worker.engine import gptq_gemm
from worker.engine.gptq_dequant import block_n, dequantize

PROBE_ROWS = 128  # where the fused GEMM and dequantize-then-dense are compared
BIG_ROWS = 1024  # and again: dequantizing once per call pays off over enough rows (AMX)
LADDER = (8, 16, 32, 64, 128, 256)  # rows tried at load; dense also wins beyond the last win
NEVER = 1 << 62  # a crossover no step reaches: the int4 kernel always
FALLBACK = 128  # when a measurement is impossible (e.g. its kernel fails)
Shape = tuple[int, int, int]  # in, out, group

_crossovers: dict[tuple[Shape, bool], int] = {}  # by shape and many-row path
_fused: dict[tuple[Shape, str], bool] = {}  # by shape and gptq_many
_dense_from: dict[Shape, int] = {}  # where a fused shape turns to dequantize-then-dense
_gemv: dict[tuple[Shape, str], bool] = {}  # by shape and gptq_many: few rows fused
_local = threading.local()  # per thread: engines stepped on two threads must not share


def dense_dtype() -> torch.dtype:
    """The dtype CPU dense matmuls should run in for bf16 work: bf16 where oneDNN has bf16
    matmuls (AVX-512), else fp32 (on the AVX2 VM torch's bf16 matmul ran 6x slower than fp32
    at 128 rows and 370x at 2048²)."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def scratch(k: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The reused [k, n] buffer this thread's dense-path layers of that shape dequantize into."""
    buffers: dict[tuple, torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get((k, n, dtype))
    if buf is None:
        with torch.inference_mode(False):  # a plain tensor, usable in and out of inference
            buf = buffers[(k, n, dtype)] = torch.empty(k, n, dtype=dtype)
    return buf


def _dispatch(layer: DispatchLinear | FusedDispatch, x: torch.Tensor) -> torch.Tensor:
    """`layer` on bf16 x [..., in]: its int4 kernel below its crossover, else its many-row
    path."""
    rows = x.numel() // layer.in_features
    flat = x.reshape(rows, layer.in_features)
    if rows >= layer.crossover:
        out = _many(layer, flat)
    elif rows < layer.gemv_below:
        out = layer.gemm(flat, torch.empty(rows, layer.out_features, dtype=torch.bfloat16))
    else:
        out = layer.int4(flat)
    if layer.bias is not None:
        out += layer.bias
    return out.view(*x.shape[:-1], layer.out_features)


def _many(layer: DispatchLinear | FusedDispatch, x: torch.Tensor) -> torch.Tensor:
    """The many-row path on bf16 x [rows, in]: the fused GEMM or dequantize-then-dense."""
    if layer.fused and len(x) < layer.dense_from:
        return layer.gemm(x, torch.empty(len(x), layer.out_features, dtype=torch.bfloat16))
    return _dense(layer, x)


def _dense(layer: DispatchLinear | FusedDispatch, x: torch.Tensor) -> torch.Tensor:
    """Dequantize, then one dense matmul in the dense path's dtype; bf16 [rows, out]."""
    weight = layer.dense_weight()
    return (x.to(weight.dtype) @ weight).to(x.dtype)


class DispatchLinear(torch.nn.Module):
    """A GPTQ linear choosing its kernel by row count: int4 below `crossover`, else the fused
    GEMM (`fused`) or dequantize (into the shared scratch buffer) then a dense matmul."""

    def __init__(self, inner: torch.nn.Module, crossover: int) -> None:
        super().__init__()
        self.inner = inner
        self.crossover, self.fused, self.dense_from = crossover, False, NEVER
        self.gemv_below = 0  # fewer rows run the fused GEMM straight from the codes
        self.tuning = ("auto", "auto")  # the (crossover, many) it was planned with
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.group_size, self.bias = inner.group_size, inner.bias
        self.dense_dtype = dense_dtype()
        ret_idx = inner.ret_idx.to(torch.int32)
        identity = torch.equal(ret_idx, torch.arange(len(ret_idx), dtype=torch.int32))
        # act-order: packed row j is input column ret_idx[j]; the int4 kernel and the fused
        # GEMM want the input columns gathered in that order, the dequantizer scatters rows back
        self.rowmap = None if identity else ret_idx.contiguous()
        self.kernel = None  # the fused GEMM, where it runs here
        if gptq_gemm.available():
            weights = [(inner.qweight, inner.scales_and_zeros)]
            self.kernel = gptq_gemm.Int4Gemm(weights, self.group_size, self.rowmap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.requires_grad:
            return self.inner(x)  # gptqmodel's own path handles the rest
        return _dispatch(self, x)

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 x [rows, in] with its columns in the packed weights' (act-)order."""
        x = x.contiguous()
        return x if self.rowmap is None else gptq_gemm.gather_columns(x, self.rowmap)

    def int4(self, x: torch.Tensor, gathered: bool = False) -> torch.Tensor:
        """The int4 kernel on bf16 [rows, in] (what gptqmodel's forward runs, minus its checks);
        `gathered`: x is already in packed order."""
        q = self.inner
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x if gathered else self.gathered(x), q.qweight, q.group_size, q.scales_and_zeros
        )

    def gemm(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The fused int4 GEMM on bf16 [rows, in] into `out` [rows, out] (may be a column
        slice); requires gptq_gemm.available()."""
        assert self.kernel is not None
        return self.kernel(x.contiguous(), out)

    def dense_weight(self) -> torch.Tensor:
        """W^T [in, out] in the shared scratch buffer (valid until the next call)."""
        out = scratch(self.in_features, self.out_features, self.dense_dtype)
        return self.dequantize_into(out)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """W^T written into `out` ([in, out] with unit column stride: may be a column slice)."""
        q = self.inner
        return dequantize(q.qweight, q.scales_and_zeros, q.group_size, out, self.rowmap)

    def extra_repr(self) -> str:
        path = "fused" if self.fused else "dense"
        return f"in={self.in_features}, out={self.out_features}, {path} from {self.crossover}"


class FusedDispatch:
    """GPTQ linears of one input (q/k/v; gate/up) as one [rows, sum of outputs] projection:
    below its crossover each runs its int4 kernel, from there all dequantize side by side into
    one scratch buffer for one dense matmul, or one fused GEMM call. Layers of one act-order
    share its column order (one input, one Hessian): x is gathered once for all of them."""

    def __init__(self, layers: list[DispatchLinear], bias: torch.Tensor | None) -> None:
        self.layers, self.bias = layers, bias
        self.in_features = layers[0].in_features
        self.out_features = sum(m.out_features for m in layers)
        self.group_size, self.dense_dtype = layers[0].group_size, layers[0].dense_dtype
        first = layers[0].rowmap
        self.shared_order = all(_same_order(m.rowmap, first) for m in layers)
        self.kernel = None
        if self.shared_order and all(m.kernel is not None for m in layers):
            weights = [(m.inner.qweight, m.inner.scales_and_zeros) for m in layers]
            self.kernel = gptq_gemm.Int4Gemm(weights, self.group_size, first)
        self.crossover, self.fused, self.dense_from = NEVER, False, NEVER
        self.gemv_below = 0
        plan(self, *layers[0].tuning)

    @staticmethod
    def fusable(layers: list[torch.nn.Module]) -> bool:
        """Two or more dispatching GPTQ linears of one input size and group."""
        return (
            len(layers) > 1
            and all(isinstance(m, DispatchLinear) for m in layers)
            and len({(m.in_features, m.group_size, m.dense_dtype) for m in layers}) == 1
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _dispatch(self, x)

    def int4(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_order:
            x = self.layers[0].gathered(x)
        return torch.cat([m.int4(x, self.shared_order) for m in self.layers], dim=-1)

    def gemm(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x.contiguous(), out)
        at = 0
        for m in self.layers:
            m.gemm(x, out[:, at : at + m.out_features])
            at += m.out_features
        return out

    def dense_weight(self) -> torch.Tensor:
        out = scratch(self.in_features, self.out_features, self.dense_dtype)
        at = 0
        for m in self.layers:
            m.dequantize_into(out[:, at : at + m.out_features])
            at += m.out_features
        return out


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two act-orders (None: none) are the same."""
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


def eligible(module: torch.nn.Module) -> bool:
    """A transformed TorchAtenLinear whose packed layout the dequantizer reads."""
    if type(module).__name__ != "TorchAtenLinear" or module.linear_mode != "inference":
        return False
    k, n = module.in_features, module.out_features
    packed, sz = module.qweight, getattr(module, "scales_and_zeros", None)
    return (
        module.bits == 4
        and block_n() is not None
        and n % block_n() == 0
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
def measure_crossover(
    layer: DispatchLinear | FusedDispatch, ladder: tuple[int, ...] = LADDER
) -> int:
    """The smallest ladder row count where the many-row path beats int4, there and at most
    of the larger counts (one noisy point does not decide); NEVER when there is none."""
    wins = []
    for rows in ladder:
        x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16)
        int4, many = _best_us((lambda x=x: layer.int4(x), lambda x=x: _many(layer, x)))
        wins.append(many < int4)
    for i, rows in enumerate(ladder):
        if wins[i] and 2 * sum(wins[i:]) > len(wins) - i:
            return rows
    return NEVER


@torch.inference_mode()
def measure_fused(layer: DispatchLinear | FusedDispatch, rows: int = PROBE_ROWS) -> bool:
    """Whether the fused GEMM beats dequantize-then-dense at `rows` (False where it cannot run)."""
    if not gptq_gemm.available():
        return False
    x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16)
    out = torch.empty(rows, layer.out_features, dtype=torch.bfloat16)
    fused, dense = _best_us((lambda: layer.gemm(x, out), lambda: _dense(layer, x)))
    return fused < dense


@torch.inference_mode()
def measure_gemv(layer: DispatchLinear | FusedDispatch) -> bool:
    """Whether the fused GEMM (straight from the codes at so few rows) beats the int4 kernel
    at one row, with its act-order gather and (fused linears) its per-linear calls."""
    x = torch.randn(1, layer.in_features, dtype=torch.bfloat16)
    out = torch.empty(1, layer.out_features, dtype=torch.bfloat16)
    int4, gemv = _best_us((lambda: layer.int4(x), lambda: layer.gemm(x, out)), repeat=20)
    return gemv < int4


def plan(
    layer: DispatchLinear | FusedDispatch, crossover: str = "auto", many: str = "auto"
) -> None:
    """Set the layer's many-row path (`fused`, and `dense_from`: BIG_ROWS where a fused shape
    measures slower than dequantize-then-dense there), `crossover`, and `gemv_below`: the rows
    below which the fused GEMM runs instead of int4 (GEMV_ROWS where it measures faster at one
    row); the overrides, else measured once per process and shape."""
    shape = (layer.in_features, layer.out_features, layer.group_size)
    many = many.strip().lower()
    usable = many != "dense" and gptq_gemm.available()
    if (shape, many) not in _gemv:
        _gemv[(shape, many)] = usable and (many == "fused" or measure_gemv(layer))
    layer.gemv_below = gptq_gemm.GEMV_ROWS if _gemv[(shape, many)] else 0
    if (shape, many) not in _fused:
        _fused[(shape, many)] = usable and (many == "fused" or measure_fused(layer))
    layer.fused = _fused[(shape, many)]
    if layer.fused and many == "auto":
        if shape not in _dense_from:
            _dense_from[shape] = NEVER if measure_fused(layer, BIG_ROWS) else BIG_ROWS
        layer.dense_from = _dense_from[shape]
    override = crossover.strip().lower()
    if override not in ("", "auto"):
        layer.crossover = int(override)
        return
    if (shape, layer.fused) not in _crossovers:
        try:
            _crossovers[(shape, layer.fused)] = measure_crossover(layer)
        except RuntimeError:
            _crossovers[(shape, layer.fused)] = FALLBACK
    layer.crossover = _crossovers[(shape, layer.fused)]


def install(
    model: torch.nn.Module, crossover: str = "auto", many: str = "auto"
) -> dict[Shape, str]:
    """Wrap every eligible GPTQ linear of `model` (in place); returns the plan per (in, out,
    group) shape ("fused 32": the fused GEMM from 32 rows; "fused below 8": and below 8 rows,
    straight from the codes). A no-op with
    crossover `off`."""
    if crossover.strip().lower() == "off":
        return {}
    chosen: dict[Shape, str] = {}
    targets = [(name, m) for name, m in model.named_modules() if eligible(m)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        layer = DispatchLinear(module, NEVER)
        layer.tuning = (crossover, many)
        plan(layer, crossover, many)
        path = "fused" if layer.fused else "dense"
        label = f"{path} {layer.crossover}" if layer.crossover < NEVER else "int4 only"
        if layer.fused and layer.dense_from < NEVER:
            label += f", dense from {layer.dense_from}"
        if layer.gemv_below:
            label += f"; fused below {layer.gemv_below}"
        chosen[(layer.in_features, layer.out_features, module.group_size)] = label
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    return chosen
