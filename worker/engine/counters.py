"""Step counters both engines keep, and the split of each step's wall time over the
sequences it computed (the per-job `compute_s`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Charged(Protocol):
    compute_s: float


@dataclass
class StepCounters:
    """Totals since the engine was built; `busy_s` equals the sum of what `charge` split."""

    steps: int = 0
    seq_steps: int = 0  # sequences sampled, summed over steps (one token each)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    recompute_tokens: int = 0  # prefill of sequences that were preempted before
    draft_tokens: int = 0  # speculative tokens verified (computed beside decodes)
    accepted_tokens: int = 0  # of those, the ones kept (in decode_tokens too)
    busy_s: float = 0.0

    def charge(
        self, elapsed: float, work: Sequence[tuple[Charged, int]], sampled: int | None = None
    ) -> None:
        """Count one step of `elapsed` seconds: each sequence gets the share of it that its
        computed tokens (a prefill chunk, or one decode token) are of the step's. `sampled`:
        the sequences that got a token (default: all; a chunk before a prompt's last gets
        none)."""
        total = sum(tokens for _, tokens in work)
        if total:
            for seq, tokens in work:
                seq.compute_s += elapsed * tokens / total
        self.steps += 1
        self.seq_steps += len(work) if sampled is None else sampled
        self.busy_s += elapsed

    def figures(self) -> dict[str, float | int]:
        """The `EngineStats` fields these counters fill (the same names)."""
        return dataclasses.asdict(self)
