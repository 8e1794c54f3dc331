"""Chunked prefill in the scheduler: the step's token budget (decodes, then continuing chunks,
then admissions), chunk sizes, the PREFILLING state, KV blocks allocated and prefix-cache
hashes added per full block as a prompt's chunks are computed."""

from __future__ import annotations

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
from scheduler import ContinuousScheduler, SeqStatus, Sequence, StepPlan


def sizes(plan: StepPlan) -> list[tuple[str, int, bool]]:
    return [(w.seq_id, len(w.token_ids), w.final) for w in plan.prefills]


def test_budget_goes_to_decodes_then_continuing_chunks_then_admissions() -> None:
    kv = KVCacheManager(num_blocks=256, block_size=4)
    sched = scheduler(kv, max_step_tokens=40, prefill_chunk_tokens=16)
    known = [make("r0", 6, 20), make("r1", 7, 20, base=100)]
    for seq in known:
        sched.add(seq)
    step(sched, sched.schedule(0.0))  # both prefilled whole, now decoding
    known.append(make("long", 100, 2, base=1000, arrival=1.0))
    sched.add(known[-1])
    plan = sched.schedule(1.0)
    assert sizes(plan) == [("long", 16, False)] and len(plan.decodes) == 2
    step(sched, plan)
    known += [make("w1", 30, 2, base=2000, arrival=2.0), make("w2", 30, 2, base=3000, arrival=2.0)]
    sched.add(known[-2])
    sched.add(known[-1])
    plan = sched.schedule(2.0)
    check_plan(sched, plan, known)
    assert [d.seq_id for d in plan.decodes] == ["r0", "r1"]  # 2 tokens
    # then the long prompt's next chunk (16), then admissions in what is left (16, then 6)
    assert sizes(plan) == [("long", 16, False), ("w1", 16, False), ("w2", 6, False)]
    assert plan.num_tokens == 40 and plan.sampled == [s for s in known[:2]]
    step(sched, plan)
    plan = sched.schedule(3.0)
    check_plan(sched, plan, known)
    assert sizes(plan) == [("long", 16, False), ("w1", 14, True), ("w2", 8, False)]


def test_decodes_are_never_squeezed_out_by_prefill() -> None:
    kv = KVCacheManager(num_blocks=256, block_size=4)
    sched = scheduler(kv, max_step_tokens=8, prefill_chunk_tokens=64)
    known = [make(f"r{i}", 3, 30, base=100 * i) for i in range(6)]
    for seq in known:
        sched.add(seq)
    step(sched, sched.schedule(0.0))  # 6 prompts of 3 tokens: 18 tokens > 8, so in chunks
    for t in range(1, 20):
        if all(s.status == SeqStatus.RUNNING for s in known):
            break
        step(sched, sched.schedule(float(t)))
    known.append(make("big", 50, 1, base=5000, arrival=50.0))
    sched.add(known[-1])
    for t in range(20, 40):
        plan = sched.schedule(float(t))
        check_plan(sched, plan, known)
        assert len(plan.decodes) == 6  # every running sequence decodes every step
        assert sum(len(w.token_ids) for w in plan.prefills) <= 2
        step(sched, plan)


def test_a_prompt_is_prefilling_until_its_final_chunk_is_sampled() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = scheduler(kv, prefill_chunk_tokens=10)
    seq = make("s", 25, 2)
    sched.add(seq)
    assert seq.status == SeqStatus.WAITING
    for start, n in ((0, 10), (10, 10)):
        plan = sched.schedule(0.0)
        assert sizes(plan) == [("s", n, False)] and plan.prefills[0].start_pos == start
        assert seq.status == SeqStatus.PREFILLING and not plan.sampled
        assert sched.on_step({}) == []  # nothing sampled, nothing appended
        assert (seq.num_computed, seq.output_ids, seq.status) == (start + n, [], "prefilling")
    plan = sched.schedule(0.0)
    assert sizes(plan) == [("s", 5, True)] and plan.sampled == [seq]
    step(sched, plan)
    assert seq.status == SeqStatus.RUNNING and seq.num_computed == 25 and len(seq.output_ids) == 1
    assert seq.computed_tokens == 25  # each chunk counted once
    plan = sched.schedule(0.0)
    assert [d.seq_id for d in plan.decodes] == ["s"] and not plan.prefills
    (done,) = step(sched, plan)
    assert done is seq and seq.status == SeqStatus.FINISHED and kv.stats().num_used == 0


def test_blocks_are_allocated_and_hashed_per_full_block_as_chunks_fill() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = scheduler(kv, prefill_chunk_tokens=10)
    seq = make("s", 43, 1)
    sched.add(seq)
    pool = kv.pool
    while seq.status != SeqStatus.FINISHED:
        plan = sched.schedule(0.0)
        (work,) = plan.prefills
        table, end = work.block_table, work.end
        assert len(table) == kv.blocks_needed(end)  # blocks for this chunk, no more
        assert kv.stats().num_used == len(table)
        done = seq.num_computed // 4  # full blocks computed by earlier chunks: cache hits
        assert [pool.is_ready(b) for b in table[: end // 4]] == [True] * done + [False] * (
            end // 4 - done
        )
        assert all(
            pool.block_hash(b) == seq.block_hashes[i] for i, b in enumerate(table[: end // 4])
        )
        assert all(pool.block_hash(b) is None for b in table[end // 4 :])  # not full yet
        step(sched, plan)
        assert all(pool.lookup(h) is not None for h in seq.block_hashes[: end // 4])
    assert len(seq.block_hashes) == 10 and pool.num_evictable == 10  # the 10 full blocks


def test_a_prompt_sharing_a_prefix_mid_prefill_waits_for_its_blocks() -> None:
    kv = KVCacheManager(num_blocks=256, block_size=4)
    sched = scheduler(kv, prefill_chunk_tokens=8)
    prefix = list(range(40))
    a = Sequence("a", prefix + [500 + i for i in range(12)], 2)
    b = Sequence("b", prefix + [900 + i for i in range(20)], 2)  # longer: admitted second
    plans = run_to_completion(sched, [a, b])
    b_first = next(i for i, p in enumerate(plans) if any(w.seq_id == "b" for w in p.prefills))
    a_chunks = [w for p in plans[:b_first] for w in p.prefills if w.seq_id == "a"]
    assert sum(len(w.token_ids) for w in a_chunks) >= 40  # b waited for the shared blocks
    assert b.num_cached == 40
    assert prefill_tokens(plans) == 52 + 60 - 40  # the prefix was computed once


def test_a_sequence_preempted_mid_prefill_keeps_its_computed_blocks_cached() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    sched = scheduler(kv, prefill_chunk_tokens=8)
    a, b = make("a", 8, 24), make("b", 32, 2, base=500, arrival=1.0)
    plans = run_to_completion(sched, [a, b])
    (at,) = [i for i, p in enumerate(plans) if "b" in p.preempted]
    before = [w for w in plans[at - 1].prefills if w.seq_id == "b"]
    assert before and not before[0].final  # b was in the middle of its prefill
    readmit = next(w for p in plans[at:] for w in p.prefills if w.seq_id == "b")
    assert b.preemptions == 1 and b.output_ids == expected_outputs(b)
    assert readmit.start_pos > 0 or kv.stats().evictions > 0  # a hit, unless a evicted them
    assert kv.stats().num_used == 0


@st.composite
def chunked(draw: st.DrawFn) -> tuple[ContinuousScheduler, list[Sequence]]:
    bs = draw(st.sampled_from([2, 4, 8]))
    prefix = list(range(draw(st.integers(0, 48))))
    seqs = [
        Sequence(
            f"c{i}",
            prefix[: draw(st.integers(0, len(prefix)))]
            + [1000 * (i + 1) + j for j in range(draw(st.integers(1, 60)))],
            draw(st.integers(1, 6)),
            arrival=float(draw(st.integers(0, 4))),
        )
        for i in range(draw(st.integers(1, 8)))
    ]
    biggest = max(-(-(len(s.token_ids) + s.max_tokens) // bs) for s in seqs)
    kv = KVCacheManager(num_blocks=biggest + draw(st.integers(0, 20)), block_size=bs)
    sched = scheduler(
        kv,
        max_num_seqs=draw(st.integers(1, 6)),
        max_step_tokens=draw(st.integers(6, 80)),
        prefill_chunk_tokens=draw(st.integers(1, 40)),
    )
    return sched, seqs


@settings(max_examples=80, deadline=None)
@given(chunked())
def test_each_block_a_chunk_fills_is_indexed_right_after_it(
    scenario: tuple[ContinuousScheduler, list[Sequence]],
) -> None:
    """As a hit, or pending on another sequence's block computing the same tokens this step
    (two prompts sharing a prefix whose chunks end inside a block both compute it)."""
    sched, seqs = scenario
    pool, bs = sched.kv.pool, sched.kv.block_size
    for seq in seqs:
        sched.add(seq)
    for t in range(5_000):
        if not sched.has_work:
            break
        plan = sched.schedule(float(t))
        check_plan(sched, plan, seqs)
        step(sched, plan)
        for w in plan.prefills:
            filled = w.seq.block_hashes[w.start_pos // bs : w.end // bs]
            assert all(pool.lookup(h) is not None or pool.is_pending(h) for h in filled)
    for seq in seqs:
        assert seq.status == SeqStatus.FINISHED and seq.output_ids == expected_outputs(seq)
    assert sched.kv.stats().num_used == 0
    assert all(pool.is_ready(b) for b in pool.indexed().values())  # nothing left pending
