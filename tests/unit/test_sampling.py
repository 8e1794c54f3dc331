"""Sampling helpers on hand-made tensors (no model): top-k/top-p, seeded draws."""

from __future__ import annotations

import pytest
import torch

from worker.engine.api import SamplingParams
from worker.engine.sampling import _filter_top_k_top_p, make_generator, sample_next


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_keeps_k_largest() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 5.0, 0.0])
    assert _kept(_filter_top_k_top_p(logits, 2, 1.0)) == {4, 1}
    assert _kept(_filter_top_k_top_p(logits, 3, 1.0)) == {4, 1, 3}
    assert _kept(_filter_top_k_top_p(logits, 0, 1.0)) == set(range(6))  # 0 disables
    assert _kept(_filter_top_k_top_p(logits, 6, 1.0)) == set(range(6))
    kept = _filter_top_k_top_p(logits, 2, 1.0)
    assert kept[4] == 5.0 and kept[1] == 3.0  # survivors keep their values


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.45, {2}), (0.55, {2, 0}), (0.75, {2, 0}), (0.85, {2, 0, 3}), (0.99, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_crossing_p(top_p: float, expected: set[int]) -> None:
    probs = torch.tensor([0.3, 0.05, 0.5, 0.15])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    assert _kept(_filter_top_k_top_p(logits, 0, top_p)) == expected


def test_top_k_then_top_p() -> None:
    logits = torch.tensor([0.3, 0.05, 0.5, 0.15]).log()
    # top_k=3 drops index 1; top_p then sees the renormalised 0.526, 0.316, 0.158 (cumulative
    # 0.526, 0.842, 1): 0.82 is crossed by two tokens (without renormalising, by three)
    assert _kept(_filter_top_k_top_p(logits, 3, 0.82)) == {2, 0}
    assert _kept(_filter_top_k_top_p(logits, 3, 0.86)) == {2, 0, 3}


def test_sample_next_greedy_and_restricted_rows() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [0.0, 2.0, 1.0, -1.0], [1.0, 1.0, 9.0, 1.0]])
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=1, seed=3),
        SamplingParams(temperature=5.0, top_p=0.01, seed=4),
    ]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    assert gens[0] is None and gens[1] is not None
    assert sample_next(logits, params, gens).tolist() == [1, 1, 2]


def test_seeded_generator_is_reproducible() -> None:
    cpu = torch.device("cpu")
    logits = torch.zeros(3, 1000)  # uniform: every draw is up to the generator
    params = [SamplingParams(temperature=1.0, seed=s) for s in (7, 7, 8)]
    runs = [sample_next(logits, params, [make_generator(p, cpu) for p in params]) for _ in "ab"]
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[0][0] == runs[0][1]  # same seed, same draw, whatever the row
    assert runs[0][0] != runs[0][2]  # 1 in 1000 chance of a clash, fixed by the seeds
    assert make_generator(SamplingParams(temperature=1.0), cpu) is None  # unseeded
    assert make_generator(SamplingParams(seed=5), cpu) is None  # greedy
