"""How an engine step's wall time is split over the sequences it computed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from worker.engine.counters import StepCounters


@dataclass
class Seq:
    compute_s: float = 0.0


def test_a_step_is_split_by_tokens_computed_and_sums_to_busy() -> None:
    counters, a, b, c = StepCounters(), Seq(), Seq(), Seq()
    counters.charge(1.0, [(a, 97), (b, 1), (c, 2)])  # a prefill of 97, two decodes of 1
    counters.charge(0.25, [(b, 1), (c, 1)])
    assert (a.compute_s, b.compute_s, c.compute_s) == pytest.approx((0.97, 0.135, 0.145))
    assert a.compute_s + b.compute_s + c.compute_s == pytest.approx(counters.busy_s, abs=1e-12)
    assert (counters.steps, counters.seq_steps, counters.busy_s) == (2, 5, 1.25)


def test_chunks_before_a_prompts_last_are_charged_but_sample_nothing() -> None:
    counters, a, b = StepCounters(), Seq(), Seq()
    counters.charge(1.0, [(a, 63), (b, 1)], sampled=1)  # a's chunk samples nothing
    assert (a.compute_s, b.compute_s) == pytest.approx((63 / 64, 1 / 64))
    assert (counters.steps, counters.seq_steps) == (1, 1)


def test_a_step_with_nothing_computed_is_still_busy_time() -> None:
    counters = StepCounters()
    counters.charge(0.5, [])
    assert (counters.steps, counters.busy_s) == (1, 0.5)
