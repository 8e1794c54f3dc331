"""Unit and property tests for scheduler.batching (pure Python, milliseconds)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import (
    BatchPolicy,
    PendingJob,
    batch_cost,
    effective_class,
    form_batches,
    next_batch,
)


def job(i: int, prompt: int, max_tokens: int = 32, priority: int = 0, t: float = 0.0) -> PendingJob:
    return PendingJob(f"j{i}", prompt, max_tokens, priority=priority, enqueued_at=t, seq=i)


def urgency_key(j: PendingJob, now: float, policy: BatchPolicy) -> tuple[int, float, int]:
    return (-effective_class(j, now, policy), j.enqueued_at, j.seq)


def waste(batches: list[list[PendingJob]]) -> int:
    real = sum(j.prompt_tokens + j.max_tokens for b in batches for j in b)
    return sum(batch_cost(b) for b in batches) - real


def test_cost_and_effective_class() -> None:
    policy = BatchPolicy(aging_s=5.0)
    assert batch_cost([]) == 0
    assert batch_cost([job(0, 10, 5), job(1, 100, 20)]) == 2 * 120
    j = job(0, 10, priority=3, t=100.0)
    assert effective_class(j, 100.0, policy) == 3
    assert effective_class(j, 104.9, policy) == 3
    assert effective_class(j, 110.0, policy) == 5
    assert effective_class(j, 90.0, policy) == 3  # clock skew does not lower the class


def test_empty_pending() -> None:
    assert next_batch([], 0.0, BatchPolicy()) == []
    assert form_batches([], 0.0, BatchPolicy()) == []


def test_batches_sorted_and_short_jobs_grouped() -> None:
    jobs = [job(i, 10 + i if i % 2 == 0 else 1000 + i) for i in range(16)]
    batches = form_batches(jobs, 0.0, BatchPolicy(max_batch_size=8, token_budget=10**6))
    assert [len(b) for b in batches] == [8, 8]
    for b in batches:
        assert b == sorted(b, key=lambda j: (j.prompt_tokens, j.seq))
    assert {j.prompt_tokens < 100 for j in batches[0]} == {True}
    assert {j.prompt_tokens >= 1000 for j in batches[1]} == {True}


def test_length_grouping_beats_fifo_padding_waste() -> None:
    rng = random.Random(1234)
    lengths = [rng.choice([16, 32, 64, 512, 1024, 2048]) + rng.randrange(16) for _ in range(32)]
    jobs = [job(i, n, t=i * 0.01) for i, n in enumerate(lengths)]
    policy = BatchPolicy(max_batch_size=8, token_budget=10**6)
    batches = form_batches(jobs, 1.0, policy)
    fifo = [jobs[i : i + 8] for i in range(0, 32, 8)]
    assert waste(batches) < waste(fifo)


def test_token_budget_and_oversized_single() -> None:
    policy = BatchPolicy(max_batch_size=8, token_budget=1000)
    jobs = [job(i, 100 + 37 * i, max_tokens=50) for i in range(12)] + [job(99, 5000)]
    batches = form_batches(jobs, 0.0, policy)
    for b in batches:
        assert len(b) == 1 or batch_cost(b) <= policy.token_budget
    assert [b for b in batches if any(j.job_id == "j99" for j in b)] == [[jobs[-1]]]


def test_max_size_and_exact_partition() -> None:
    rng = random.Random(7)
    jobs = [job(i, rng.randrange(1, 300), priority=rng.randrange(10)) for i in range(50)]
    batches = form_batches(jobs, 3.0, BatchPolicy(max_batch_size=6, token_budget=4000))
    assert all(1 <= len(b) <= 6 for b in batches)
    assert Counter(j.job_id for b in batches for j in b) == Counter(j.job_id for j in jobs)


def test_high_priority_last_arrival_in_first_batch() -> None:
    jobs = [job(i, 50 + i, t=float(i)) for i in range(20)]
    vip = job(20, 4000, priority=9, t=20.0)
    first = next_batch([*jobs, vip], 20.0, BatchPolicy(max_batch_size=4, aging_s=100.0))
    assert vip in first


def test_priority_classes_ordered() -> None:
    jobs = [job(i, 10, priority=i % 10, t=float(i)) for i in range(10)]
    batches = form_batches(jobs, 10.0, BatchPolicy(max_batch_size=1, aging_s=1000.0))
    assert [b[0].priority for b in batches] == list(range(9, -1, -1))


def test_no_starvation_of_long_low_priority_job() -> None:
    policy = BatchPolicy(max_batch_size=8, token_budget=4096, aging_s=1.0)
    long_job = PendingJob("long", 4000, 64, priority=0, enqueued_at=0.0, seq=0)
    pending, seq, now, served_round = [long_job], 1, 0.0, None
    for rnd in range(30):
        for _ in range(8):  # fresh high-priority short jobs, as many as a batch holds
            pending.append(PendingJob(f"s{seq}", 10, 16, priority=9, enqueued_at=now, seq=seq))
            seq += 1
        batch = next_batch(pending, now, policy)
        ids = {j.job_id for j in batch}
        pending = [j for j in pending if j.job_id not in ids]
        if "long" in ids:
            served_round = rnd
            assert batch == [long_job]  # too long to share the budget
            break
        now += 1.0
    # Class 0 catches up with fresh class-9 jobs after 9 aging periods; it wins the tie on age.
    assert served_round is not None and 1 <= served_round <= 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"token_budget": -1},
        {"aging_s": 0.0},
        {"aging_s": float("nan")},
        {"aging_s": float("inf")},
        {"lookahead": 0},
    ],
)
def test_invalid_policy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**kwargs)


def test_invalid_jobs_and_duplicate_ids() -> None:
    with pytest.raises(ValueError):
        job(0, -1)
    with pytest.raises(ValueError):
        job(0, 1, priority=10)
    dup = [job(0, 10), PendingJob("j0", 20, 5, seq=1)]
    with pytest.raises(ValueError, match="duplicate"):
        next_batch(dup, 0.0, BatchPolicy())
    with pytest.raises(ValueError, match="duplicate"):
        form_batches(dup, 0.0, BatchPolicy())


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[PendingJob], float, BatchPolicy]:
    n = draw(st.integers(0, 40))
    jobs = [
        PendingJob(
            f"j{i}",
            draw(st.integers(0, 2000)),
            draw(st.integers(0, 500)),
            priority=draw(st.integers(0, 9)),
            enqueued_at=draw(st.floats(0.0, 30.0)),
            seq=draw(st.integers(0, 5)),  # collisions exercise the job_id/urgency tie-breaks
        )
        for i in range(n)
    ]
    policy = BatchPolicy(
        max_batch_size=draw(st.integers(1, 8)),
        token_budget=draw(st.integers(1, 10_000)),
        aging_s=draw(st.floats(0.5, 10.0)),
        lookahead=draw(st.integers(1, 4)),
    )
    return jobs, draw(st.floats(0.0, 60.0)), policy


def check_batch(batch: list[PendingJob], policy: BatchPolicy) -> None:
    assert 1 <= len(batch) <= policy.max_batch_size
    assert len(batch) == 1 or batch_cost(batch) <= policy.token_budget
    assert batch == sorted(batch, key=lambda j: (j.prompt_tokens, j.seq))


@settings(max_examples=200, deadline=None)
@given(workloads())
def test_property_next_batch(w: tuple[list[PendingJob], float, BatchPolicy]) -> None:
    jobs, now, policy = w
    batch = next_batch(jobs, now, policy)
    if not jobs:
        assert batch == []
        return
    check_batch(batch, policy)
    anchor = min(jobs, key=lambda j: urgency_key(j, now, policy))
    assert anchor in batch
    cutoff = sorted(jobs, key=lambda j: urgency_key(j, now, policy))[
        : policy.max_batch_size * policy.lookahead
    ]
    assert all(j in cutoff for j in batch)


@settings(max_examples=100, deadline=None)
@given(workloads())
def test_property_form_batches_partitions(w: tuple[list[PendingJob], float, BatchPolicy]) -> None:
    jobs, now, policy = w
    batches = form_batches(jobs, now, policy)
    for b in batches:
        check_batch(b, policy)
    assert sorted(j.job_id for b in batches for j in b) == sorted(j.job_id for j in jobs)
