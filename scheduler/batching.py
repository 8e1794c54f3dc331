"""Batch formation: priority with aging, then length grouping under a padded-token budget.

Pure Python over job metadata; the caller passes ``now`` so results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PendingJob:
    """A queued request as the scheduler sees it."""

    job_id: str
    prompt_tokens: int
    max_tokens: int
    priority: int = 0  # 0..9, higher runs first
    enqueued_at: float = 0.0  # seconds, same clock as `now`
    seq: int = 0  # arrival order tie-breaker

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.max_tokens < 0:
            raise ValueError(f"job {self.job_id!r}: token counts must be >= 0")
        if not 0 <= self.priority <= 9:
            raise ValueError(f"job {self.job_id!r}: priority must be in 0..9")


@dataclass(frozen=True)
class BatchPolicy:
    """Knobs for :func:`next_batch`; every value must be positive."""

    max_batch_size: int = 16
    token_budget: int = 8192  # padded cost: size * max(prompt_tokens + max_tokens)
    aging_s: float = 5.0  # every aging_s of waiting raises a job's effective class by one
    lookahead: int = 4  # consider the max_batch_size*lookahead most urgent jobs

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "token_budget", "aging_s", "lookahead"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"BatchPolicy.{name} must be positive and finite, got {value!r}")


def batch_cost(jobs: Sequence[PendingJob]) -> int:
    """Padded token cost of running ``jobs`` together: len * max(prompt + max_tokens)."""
    if not jobs:
        return 0
    return len(jobs) * max(j.prompt_tokens + j.max_tokens for j in jobs)


def effective_class(job: PendingJob, now: float, policy: BatchPolicy) -> int:
    """Priority plus one class per full ``aging_s`` waited (a future enqueue time counts as 0)."""
    waited = max(0.0, now - job.enqueued_at)
    return job.priority + math.floor(waited / policy.aging_s)


def _check_unique(pending: Sequence[PendingJob]) -> None:
    seen: set[str] = set()
    for job in pending:
        if job.job_id in seen:
            raise ValueError(f"duplicate job_id in pending: {job.job_id!r}")
        seen.add(job.job_id)


def next_batch(pending: Sequence[PendingJob], now: float, policy: BatchPolicy) -> list[PendingJob]:
    """Pick the next batch: the most urgent job plus its nearest-length neighbours.

    The anchor (highest effective class, then oldest, then lowest seq) is always included,
    even when it alone exceeds the token budget. Returned sorted by (prompt_tokens, seq).
    """
    _check_unique(pending)
    if not pending:
        return []
    by_urgency = sorted(
        pending, key=lambda j: (-effective_class(j, now, policy), j.enqueued_at, j.seq)
    )
    candidates = by_urgency[: policy.max_batch_size * policy.lookahead]
    rank = {j.job_id: i for i, j in enumerate(candidates)}
    by_length = sorted(candidates, key=lambda j: (j.prompt_tokens, rank[j.job_id]))
    anchor = by_urgency[0]
    lo = hi = by_length.index(anchor)
    window = [anchor]
    width = anchor.prompt_tokens + anchor.max_tokens  # max(prompt + max_tokens) in window

    def fits(job: PendingJob) -> bool:
        return (len(window) + 1) * max(width, job.prompt_tokens + job.max_tokens) <= (
            policy.token_budget
        )

    # The window only grows, so a side whose neighbour does not fit never fits later.
    while len(window) < policy.max_batch_size:
        options = []
        if lo > 0 and fits(by_length[lo - 1]):
            options.append((lo - 1, by_length[lo - 1]))
        if hi + 1 < len(by_length) and fits(by_length[hi + 1]):
            options.append((hi + 1, by_length[hi + 1]))
        if not options:
            break
        idx, job = min(
            options,
            key=lambda o: (abs(o[1].prompt_tokens - anchor.prompt_tokens), rank[o[1].job_id]),
        )
        lo, hi = min(lo, idx), max(hi, idx)
        window.append(job)
        width = max(width, job.prompt_tokens + job.max_tokens)
    return sorted(window, key=lambda j: (j.prompt_tokens, j.seq))


def form_batches(
    pending: Sequence[PendingJob], now: float, policy: BatchPolicy
) -> list[list[PendingJob]]:
    """Partition ``pending`` into batches by calling :func:`next_batch` until none remain."""
    _check_unique(pending)
    remaining = list(pending)
    batches: list[list[PendingJob]] = []
    while remaining:
        batch = next_batch(remaining, now, policy)
        taken = {j.job_id for j in batch}
        remaining = [j for j in remaining if j.job_id not in taken]
        batches.append(batch)
    return batches
