"""Where dequantize-then-dense beats the int4 CPU kernel, per matmul shape and row count.

Usage: .venv/bin/python bench/gptq_crossover.py [--group 32] [--rows 1,8,32,64,128,256,512]
For SmolLM2-135M's linear shapes (in -> out) it times, with random 4-bit codes:
- int4: `aten._weight_int4pack_mm_for_cpu` (what the `gptq_torch_aten` backend runs);
- dequant + dense: nibble-packed codes (still 4 bits a weight) unpacked to bf16 with their
  group scales and offsets, then a dense bf16 `linear`; the dequantization is paid per call.
Prints one line per (shape, rows) and the smallest row count from which the second wins: the
crossover a per-shape kernel choice would use (issue 13).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 192)]  # MLP up/gate, down, q/o, k/v


def timed(fn: Callable[[], object], repeat: int = 20) -> float:
    """Mean milliseconds per call after two warm-up calls."""
    fn(), fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat * 1e3


def shape_rows(k: int, n: int, group: int, rows: list[int]) -> int | None:
    """Time both paths for a k -> n linear; the first row count where dequant + dense wins."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = torch.rand(k // group, n, dtype=torch.bfloat16) * 0.01
    offsets = torch.rand(k // group, n, dtype=torch.bfloat16) * 0.01
    scales_and_zeros = torch.stack([scales, offsets], -1).contiguous()
    nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    scale_t = scales.t().contiguous().unsqueeze(-1)  # [n, groups, 1]
    offset_t = offsets.t().contiguous().unsqueeze(-1)

    def dequantize() -> torch.Tensor:
        unpacked = torch.stack((nibbles & 15, nibbles >> 4), -1).view(n, k // group, group)
        return (unpacked.to(torch.bfloat16) * scale_t + offset_t).view(n, k)

    dense = dequantize()
    crossover = None
    for r in rows:
        x = torch.rand(r, k, dtype=torch.bfloat16)
        int4 = timed(lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, group, scales_and_zeros))  # fmt: skip
        unpack = timed(dequantize)
        matmul = timed(lambda x=x: torch.nn.functional.linear(x, dense))
        if crossover is None and unpack + matmul < int4:
            crossover = r
        print(f"{k:>5} -> {n:<5} rows {r:>4}: int4 {int4:7.3f} ms | dequant {unpack:7.3f} + "
              f"dense {matmul:7.3f} = {unpack + matmul:7.3f} ms", flush=True)  # fmt: skip
    return crossover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--rows", default="1,8,32,64,128,256,512")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    found = {f"{k}->{n}": shape_rows(k, n, args.group, rows) for k, n in SHAPES}
    print("crossover rows (dequant + dense wins from):", found)


if __name__ == "__main__":
    main()
