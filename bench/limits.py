"""What this machine's matmuls allow: the square-matmul peak, and a ceiling priced at the
model's own linear-layer shapes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from worker.engine.gptq_dispatch import dense_dtype


def best_seconds(fn, device: torch.device, reps: int = 5) -> float:
    """Best wall time of `fn()` over `reps` runs, after one warm-up run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    best = float("inf")
    for _ in range(reps + 1):  # the first rep also warms up
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the engine's dense matmuls run in for `dtype`: fp32 for bf16 on a CPU where
    oneDNN has no bf16 matmul (AVX2; worker/engine/lean.py widens such weights once)."""
    return dense_dtype() if device.type == "cpu" and dtype == torch.bfloat16 else dtype


def matmul_peak_gflops(
    device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5
) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), device, reps) / 1e9


@dataclass
class Ceiling:
    """Seconds per computed position for the model's linear layers, and for its LM head per
    output token, timed on random weights of the same shapes at `rows` rows per step (each
    shape's weights stay cache-warm across repeats, so the ceiling is an upper bound)."""

    per_position: float
    per_output: float

    @classmethod
    def measure(cls, model, rows: int, device: torch.device, dtype: torch.dtype) -> Ceiling:
        head = model.get_output_embeddings()
        shapes = [
            (m.in_features, m.out_features)
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m is not head
        ]

        def seconds(fan_in: int, fan_out: int) -> float:
            x = torch.randn(rows, fan_in, device=device, dtype=dtype)
            w = torch.randn(fan_out, fan_in, device=device, dtype=dtype)
            return best_seconds(lambda: torch.nn.functional.linear(x, w), device, 3) / rows

        memo = {shape: seconds(*shape) for shape in set(shapes)}
        return cls(sum(memo[s] for s in shapes), seconds(head.in_features, head.out_features))

    def tokens_per_s(self, computed: int, out_tokens: int) -> float:
        """Output tokens/s of a run that computed `computed` positions for `out_tokens` output
        tokens, if only its linear layers took time."""
        return out_tokens / (computed * self.per_position + out_tokens * self.per_output)
