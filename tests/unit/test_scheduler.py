"""The continuous-batching scheduler and its `Sequence` over the real KV cache manager."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_helpers import (
    check_plan,
    expected_outputs,
    make,
    prefill_tokens,
    run_to_completion,
    scheduler,
    step,
)

from kv.manager import KVCacheManager
from scheduler import ContinuousScheduler, SeqStatus, Sequence

# -- basics ------------------------------------------------------------------------------------


def test_add_validation_and_abort() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = scheduler(kv)
    with pytest.raises(ValueError):
        sched.add(Sequence("e", [], 1))
    with pytest.raises(ValueError):
        sched.add(make("big", 15, max_tokens=2))  # 17 tokens > 16 slots
    sched.add(make("a", 4))
    with pytest.raises(ValueError):
        sched.add(make("a", 4))
    sched.add(make("b", 4))
    plan = sched.schedule(0.0)
    assert sched.num_running == 2
    sched.on_step({w.seq_id: 1 for w in plan.prefills})
    sched.abort("a")
    sched.abort("missing")
    assert sched.get("a") is None and sched.num_running == 1
    sched.abort("b")
    assert not sched.has_work and kv.stats().num_used == 0


def test_many_seqs_all_finish_and_free_every_block() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=16)
    sched = scheduler(kv, max_num_seqs=8, max_step_tokens=256)
    seqs = [make(f"s{i}", 5 + (i * 37) % 90, 1 + i % 9, base=1000 * i) for i in range(40)]
    run_to_completion(sched, seqs)
    assert all(s.status == SeqStatus.FINISHED and len(s.output_ids) == s.max_tokens for s in seqs)
    assert kv.stats().num_used == 0


class StopAt(Sequence):
    """A sequence that also finishes on a given token (as an engine's eos does)."""

    stop_token = 2

    def append(self, token: int) -> bool:
        return super().append(token) or token == self.stop_token


def test_the_sequence_decides_when_it_is_finished() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = scheduler(kv)
    sched.add(StopAt("a", list(range(6)), 10))
    sched.schedule(0.0)
    assert sched.on_step({"a": 1}) == []
    sched.schedule(1.0)
    (done,) = sched.on_step({"a": 2})
    assert done.output_ids == [1, 2] and done.num_computed == 7
    assert done.computed_tokens == 7 and done.status == SeqStatus.FINISHED
    assert not sched.has_work and kv.stats().num_used == 0


def test_sequence_ids_and_hashes_are_cached() -> None:
    seq = Sequence("s", list(range(5)), 3)
    assert (seq.prompt_ids, seq.output_ids, seq.num_prompt_tokens) == ([0, 1, 2, 3, 4], [], 5)
    assert not seq.append(7) and not seq.append(8)
    assert seq.output_ids == [7, 8] and seq.token_ids == [0, 1, 2, 3, 4, 7, 8]
    assert seq.append(9)  # max_tokens reached
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = scheduler(kv)
    seq = make("h", 10, max_tokens=7)
    sched.add(seq)
    sched.schedule(0.0)
    assert seq.block_hashes == kv.hashes(seq.token_ids, "")  # hashed at admission
    first = seq.block_hashes[0]
    run_to_completion(sched)
    assert seq.block_hashes[0] is first  # extended in place, never recomputed
    assert seq.block_hashes == kv.hashes(seq.token_ids[: seq.num_computed], "")
    assert len(seq.block_hashes) == 4  # 10 + 6 fed-back tokens = 16 = 4 full blocks


# -- prefix sharing ----------------------------------------------------------------------------


def test_shared_prefix_is_prefilled_once() -> None:
    kv = KVCacheManager(num_blocks=256, block_size=16)
    sched = scheduler(kv)
    prefix = list(range(64))
    seqs = [
        Sequence(f"p{i}", prefix + [10_000 + 100 * i + j for j in range(5 + i)], 3)
        for i in range(8)
    ]
    plans = run_to_completion(sched, seqs)
    assert len(plans[0].prefills) == 1  # the others wait for the shared prefix
    assert len(plans[1].prefills) == 7
    assert all(p.start_pos == 64 for p in plans[1].prefills)
    first = plans[0].prefills[0].seq_id
    assert all(s.num_cached == 64 for s in seqs if s.seq_id != first)
    assert prefill_tokens(plans) == sum(len(s.prompt_ids) for s in seqs) - 7 * 64
    assert kv.stats().num_used == 0


def test_salts_isolate_the_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=16)
    sched = scheduler(kv)
    run_to_completion(sched, [make("a", 40, salt="tenant-a")])
    other, same = make("b", 40, salt="tenant-b"), make("c", 40, salt="tenant-a")
    run_to_completion(sched, [other])
    run_to_completion(sched, [same])
    assert other.num_cached == 0
    assert same.num_cached == 32  # control: same salt hits both full blocks


# -- limits ------------------------------------------------------------------------------------


def test_token_budget_and_seq_cap() -> None:
    kv = KVCacheManager(num_blocks=512, block_size=16)
    sched = scheduler(kv, max_num_seqs=4, max_step_tokens=128)
    seqs = [make(f"s{i}", 20 + 7 * i, 5, base=1000 * i) for i in range(12)]
    seqs.append(make("huge", 300, 3, base=99_000))
    plans = run_to_completion(sched, seqs)  # check_plan asserts the limits every step
    assert max(len(p.prefills) + len(p.decodes) for p in plans) == 4
    assert max(p.num_tokens for p in plans) == 128
    huge = [w for p in plans for w in p.prefills if w.seq_id == "huge"]
    assert len(huge) >= 3 and [w.final for w in huge] == [False] * (len(huge) - 1) + [True]
    assert sum(len(w.token_ids) for w in huge) == 300  # chunks past the budget, no more


def test_preemption_under_a_tiny_pool() -> None:
    kv = KVCacheManager(num_blocks=12, block_size=4)
    sched = scheduler(kv, max_num_seqs=8)
    seqs = [make(f"s{i}", 8, 16, base=100 * i, arrival=0.1 * i) for i in range(4)]
    plans = run_to_completion(sched, seqs)
    preempted = [sid for p in plans for sid in p.preempted]
    assert preempted
    assert "s0" not in preempted  # the most urgent keeps its blocks
    for sid in set(preempted):
        seq = next(s for s in seqs if s.seq_id == sid)
        assert seq.preemptions >= 1 and seq.output_ids == expected_outputs(seq)
        readmits = [w for p in plans for w in p.prefills if w.seq_id == sid]
        assert len(readmits) == 1 + seq.preemptions
        assert len(readmits[-1].token_ids) + readmits[-1].start_pos > 8  # recomputes outputs
    assert kv.stats().num_used == 0


# -- priority and aging ------------------------------------------------------------------------


def test_high_priority_late_arrival_goes_first() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=16)
    sched = scheduler(kv, max_num_seqs=1)
    lows = [make(f"low{i}", 10, 2, base=100 * i, arrival=0.0) for i in range(3)]
    high = make("high", 30, 2, base=900, priority=3, arrival=1.0)
    plans = run_to_completion(sched, lows, arrivals={1: [high]})
    order = [w.seq_id for p in plans for w in p.prefills]
    assert order[0] == "low0" and order[1] == "high"


def _stream(aging_s: float) -> int | None:
    """Step at which a long priority-0 job is admitted amid a flood of short priority-5 jobs.

    The flood fills the sequence cap and the budget, so the long job needs the head-of-line
    rule (nobody overtakes it) as well as aging (it becomes the head).
    """
    kv = KVCacheManager(num_blocks=1024, block_size=16)
    sched = scheduler(kv, max_num_seqs=16, max_step_tokens=64, aging_s=aging_s)
    known = [make("long", 62, 2, base=50_000)]
    sched.add(known[0])
    for n in range(40):
        for _ in range(4):  # arrivals outpace service: the short queue never empties
            known.append(
                make(f"s{len(known)}", 16, 3, base=100 * len(known), priority=5, arrival=float(n))
            )
            sched.add(known[-1])
        plan = sched.schedule(float(n))
        check_plan(sched, plan, known)
        if any(w.seq_id == "long" for w in plan.prefills):
            return n
        step(sched, plan)
    return None


def test_aging_and_head_of_line_prevent_starvation() -> None:
    step = _stream(aging_s=1.0)
    assert step is not None and step < 30
    assert _stream(aging_s=1e9) is None  # control: without aging it starves


def test_blocked_head_is_not_overtaken() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    sched = scheduler(kv)
    sched.add(make("r", 20, 4))
    plan = sched.schedule(0.0)
    sched.on_step({"r": 1})
    sched.add(make("big", 24, 2, base=100, priority=1))  # needs 6 blocks, 4 are left
    sched.add(make("small", 4, 2, base=200))  # would fit, but must not overtake
    plan = sched.schedule(1.0)
    assert [d.seq_id for d in plan.decodes] == ["r"] and plan.prefills == []


def test_cached_prefix_goes_first_within_a_class() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=16)
    sched = scheduler(kv, max_num_seqs=1)
    run_to_completion(sched, [make("warm", 40)])
    plans = run_to_completion(sched, [make("short", 10, base=500), make("cached", 40)])
    assert plans[0].prefills[0].seq_id == "cached" and plans[0].prefills[0].start_pos == 32


# -- property ----------------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ContinuousScheduler, dict[int, list[Sequence]]]:
    bs = draw(st.sampled_from([2, 4, 8, 16]))
    prefixes = [[7_000 * (k + 1) + i for i in range(draw(st.integers(1, 40)))] for k in range(3)]
    arrivals: dict[int, list[Sequence]] = {}
    biggest = 0
    for i in range(draw(st.integers(1, 14))):
        pre = draw(st.sampled_from([None, 0, 1, 2]))
        prompt = ([] if pre is None else prefixes[pre]) + [
            100 * i + j for j in range(draw(st.integers(0 if pre is not None else 1, 30)))
        ]
        seq = Sequence(
            f"q{i}",
            prompt,
            draw(st.integers(1, 12)),
            priority=draw(st.integers(0, 3)),
            salt=draw(st.sampled_from(["", "x"])),
            arrival=float(draw(st.integers(0, 6))),
        )
        biggest = max(biggest, -(-(len(prompt) + seq.max_tokens) // bs))
        arrivals.setdefault(int(seq.arrival), []).append(seq)
    kv = KVCacheManager(num_blocks=biggest + draw(st.integers(0, 12)), block_size=bs)
    sched = ContinuousScheduler(
        kv,
        max_num_seqs=draw(st.integers(1, 6)),
        max_step_tokens=draw(st.integers(4, 96)),
        prefill_chunk_tokens=draw(st.integers(1, 64)),
        aging_s=draw(st.sampled_from([0.5, 3.0, 100.0])),
    )
    return sched, arrivals


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_random_workloads_run_to_completion(
    scenario: tuple[ContinuousScheduler, dict[int, list[Sequence]]],
) -> None:
    sched, arrivals = scenario
    seqs = [s for group in arrivals.values() for s in group]
    run_to_completion(sched, arrivals=arrivals)
    for seq in seqs:
        assert seq.status == SeqStatus.FINISHED and seq.output_ids == expected_outputs(seq)
    assert sched.kv.stats().num_used == 0
