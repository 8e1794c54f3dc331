"""Speculative decoding without a model: prompt-lookup drafts (`NgramIndex`), the drafting
policy, the scheduler's verify work and KV slots, and the acceptance rule of
`sample_verified`, which must keep the target distribution (checked by chi-square on a
six-token vocabulary)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scheduler_helpers import make, scheduler

from kv import KVCacheManager
from kv.hashing import block_hashes
from scheduler import Speculation
from scheduler.ngram import NgramIndex
from worker.engine.api import SamplingParams
from worker.engine.sampling import sample_verified

# -- drafting ------------------------------------------------------------------------------


def test_the_longest_ngram_and_its_latest_occurrence_propose() -> None:
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3]
    # [1, 2, 3] occurred at 0..2 (followed by 9, 9); shorter [2, 3] more recently (7, 8)
    assert index.propose(tokens, 2) == [9, 9]
    tokens += [9, 4]
    assert index.propose(tokens, 3) == []  # [9, 4], [4]: never seen before
    tokens += [5, 9]  # [9] last seen at 12, followed by 4, 5, 9, then by the copy itself
    assert index.propose(tokens, 5) == [4, 5, 9, 4, 5]


def test_min_n_refuses_short_matches() -> None:
    assert NgramIndex(2, 3).propose([5, 1, 6, 1], 4) == []  # only [1] repeats
    assert NgramIndex(1, 3).propose([5, 1, 6, 1], 4) == [6, 1, 6, 1]


def test_low_acceptance_drafts_only_at_probes() -> None:
    spec = Speculation(4, min_acceptance=0.5)
    drafts = spec.new_drafts()
    tokens = [1, 2] * 8
    assert spec.draft(drafts, tokens, 4) == [1, 2, 1, 2]
    drafts.record(8, 1)  # 1 of 8 kept
    assert spec.draft(drafts, [*tokens, 1], 4) == []
    assert spec.draft(drafts, tokens, 4) != []  # 16 tokens: a probe (every 8th)
    drafts.record(16, 16)
    assert spec.draft(drafts, [*tokens, 1], 4) != []


# -- the scheduler -------------------------------------------------------------------------


def test_rejected_draft_slots_are_reused_and_never_hashed() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = scheduler(kv, speculation=Speculation(4, max_running=2))
    seq = make("a", 10, 30, base=0)
    seq.token_ids[:] = [1, 2, 3, 4, 5] * 2
    sched.add(seq)
    sched.schedule(0.0)
    sched.on_step({"a": 1})  # the prompt's prefill, then a 1
    plan = sched.schedule(1.0)  # [.., 5, 1]: drafts 2, 3, 4, 5 after the 1
    (work,) = plan.decodes
    assert work.draft == (2, 3, 4, 5) and len(work.block_table) * 4 >= 11 + 4
    sched.on_step({"a": [2, 3, 9]})  # two accepted, the third rejected for 9
    assert seq.token_ids[10:] == [1, 2, 3, 9] and seq.num_computed == 13
    assert (seq.draft_tokens, seq.accepted_tokens) == (4, 2)
    held = set(kv.pool.indexed())
    assert held <= set(block_hashes(seq.token_ids, 4, kv.model_id, seq.salt))
    plan = sched.schedule(2.0)  # the 9 is fed at 13, over the rejected draft's slot
    assert plan.decodes[0].pos == 13 and plan.decodes[0].token_id == 9


def test_drafts_never_preempt_and_respect_the_budget() -> None:
    """After the decodes' own slots one block is free and the budget has 4 tokens to spare:
    the first sequence drafts 4 into that block, the second nothing, nobody is preempted."""
    kv = KVCacheManager(num_blocks=7, block_size=4)
    sched = scheduler(kv, max_step_tokens=16, speculation=Speculation(4, max_running=4))
    for name, pair in (("a", [1, 2]), ("b", [3, 4])):
        seq = make(name, 8, 12)
        seq.token_ids[:] = pair * 4
        sched.add(seq)
    sched.schedule(0.0)
    sched.on_step({"a": 1, "b": 1})
    sched.max_step_tokens = 6
    plan = sched.schedule(1.0)
    assert not plan.preempted and plan.num_tokens == 6
    assert [d.draft for d in plan.decodes] == [(2, 1, 2, 1), ()]
    assert kv.pool.num_available == 0


# -- the acceptance rule -------------------------------------------------------------------

CHI2_DF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001
TRIALS = 4000


def _chi2(counts: Counter[int], probs: torch.Tensor) -> float:
    n = sum(counts.values())
    return sum((counts.get(t, 0) - n * float(p)) ** 2 / (n * float(p)) for t, p in enumerate(probs))


@pytest.mark.parametrize("draft", [(0, 3), (4, 4)], ids=["likely", "unlikely"])
def test_sampling_with_drafts_keeps_the_target_distribution(draft: tuple[int, int]) -> None:
    """Three positions over six tokens: the first token kept is distributed as p0 whatever
    the draft; given it equals the first draft, the next as p1; given both, the third as
    p2. A rule that accepted drafts too often (or resampled rejections from p) fails."""
    logits = torch.log(
        torch.tensor(
            [
                [0.40, 0.05, 0.20, 0.10, 0.20, 0.05],
                [0.10, 0.10, 0.10, 0.45, 0.15, 0.10],
                [0.25, 0.15, 0.15, 0.15, 0.15, 0.15],
            ]
        )
    )
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(3)
    at: list[Counter[int]] = [Counter(), Counter(), Counter()]
    for _ in range(TRIALS):
        (kept,) = sample_verified(logits, [params], [gen], [draft])
        assert kept[:-1] == list(draft[: len(kept) - 1])  # only matching drafts are kept
        for i, token in enumerate(kept):
            at[i][token] += 1
    probs = logits.softmax(-1)
    for i in range(3):
        assert sum(at[i].values()) > 100  # enough draws reach this position
        assert _chi2(at[i], probs[i]) < CHI2_DF5_P001, (i, at[i])
    assert at[0][draft[0]] / TRIALS == pytest.approx(float(probs[0, draft[0]]), abs=0.03)


def test_greedy_keeps_drafts_while_they_are_the_argmax() -> None:
    logits = torch.eye(6)[[2, 4, 1, 0]] * 5  # argmax: 2, 4, 1, 0
    greedy = SamplingParams()
    cases = [(2, 4, 1), (2, 5, 1), (3,)]
    kept = sample_verified(logits[:4], [greedy], [None], [cases[0]])
    assert kept == [[2, 4, 1, 0]]  # all accepted, then the bonus token
    assert sample_verified(logits[:4], [greedy], [None], [cases[1]]) == [[2, 4]]
    assert sample_verified(logits[:2], [greedy], [None], [cases[2]]) == [[2]]
