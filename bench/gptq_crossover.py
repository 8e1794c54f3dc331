"""Where dequantize-then-dense beats the int4 CPU kernel, per matmul shape and row count.

Usage: .venv/bin/python bench/gptq_crossover.py [--group 32] [--rows 1,8,32,64,128,256,512]
For SmolLM2-135M's linear shapes (in -> out) it times, with random 4-bit codes:
- int4: `aten._weight_int4pack_mm_for_cpu` (what the `gptq_torch_aten` backend runs);
- dequant + dense: the packed int4 weights (still 4 bits a weight) dequantized to bf16 by
  worker.engine.gptq_dequant (the compiled kernel; `--torch-dequant`: its torch-ops fallback),
  then a dense bf16 `linear`; the dequantization is paid per call, as the engine pays it.
Prints the dequantization alone per shape (µs, GB/s moved: 0.5 B read + 2 B written a weight),
one line per (shape, rows), and the smallest row count from which the second wins: what
worker.engine.gptq_dispatch measures at load time (with fewer rows and repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from worker.engine import gptq_dequant

SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 192)]  # MLP up/gate, down, q/o, k/v


def timed(fn: Callable[[], object], repeat: int = 20) -> float:
    """Median milliseconds per call after two warm-up calls (the median: a shared CPU)."""
    fn(), fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def shape_rows(k: int, n: int, group: int, rows: list[int]) -> int | None:
    """Time both paths for a k -> n linear; the first row count where dequant + dense wins."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = torch.rand(k // group, n, dtype=torch.bfloat16) * 0.01
    offsets = torch.rand(k // group, n, dtype=torch.bfloat16) * 0.01
    scales_and_zeros = torch.stack([scales, offsets], -1).contiguous()
    buf = torch.empty(k, n, dtype=torch.bfloat16)

    def dequantize() -> torch.Tensor:
        return gptq_dequant.dequantize(packed, scales_and_zeros, group, buf)

    unpack = timed(dequantize)
    print(
        f"{k:>5} -> {n:<5} dequantize {unpack * 1e3:7.1f} µs = "
        f"{k * n * 2.5 / unpack / 1e6:5.1f} GB/s",
        flush=True,
    )
    crossover = None
    for r in rows:
        x = torch.rand(r, k, dtype=torch.bfloat16)
        int4 = timed(
            lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, packed, group, scales_and_zeros
            )
        )
        both = timed(lambda x=x: torch.nn.functional.linear(x, dequantize().t()))
        if crossover is None and both < int4:
            crossover = r
        print(
            f"{k:>5} -> {n:<5} rows {r:>4}: int4 {int4:7.3f} ms | dequant + dense {both:7.3f} ms",
            flush=True,
        )
    return crossover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--rows", default="1,8,32,64,128,256,512")
    parser.add_argument("--torch-dequant", action="store_true", help="the torch-ops fallback")
    args = parser.parse_args()
    if args.torch_dequant:
        gptq_dequant.c_kernel = lambda: None
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    print(
        f"{torch.get_num_threads()} threads, dequantizer: "
        f"{'torch ops' if gptq_dequant.c_kernel() is None else 'compiled C'}"
    )
    found = {f"{k}->{n}": shape_rows(k, n, args.group, rows) for k, n in SHAPES}
    print("crossover rows (dequant + dense wins from):", found)


if __name__ == "__main__":
    main()
