"""Shared by the scheduler tests: a scheduler with the engine's limits, fake sampling, and the
invariants every plan must keep."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from inferq.params import EngineConfig
from kv.manager import KVCacheManager
from scheduler import ContinuousScheduler, SeqStatus, Sequence, Speculation, StepPlan


def scheduler(
    kv: KVCacheManager, speculation: Speculation | None = None, **limits: float
) -> ContinuousScheduler:
    """A scheduler with the engine's default limits (`EngineConfig`), some overridden."""
    cfg = EngineConfig(**limits)  # type: ignore[arg-type]
    return ContinuousScheduler(
        kv,
        max_num_seqs=cfg.max_num_seqs,
        max_step_tokens=cfg.max_step_tokens,
        prefill_chunk_tokens=cfg.prefill_chunk_tokens,
        aging_s=cfg.aging_s,
        speculation=speculation,
    )


def fake_token(seq_id: str, n: int) -> int:
    """Deterministic 'sampled' token number ``n`` of ``seq_id``."""
    return (zlib.crc32(seq_id.encode()) + 7919 * n) % 50_000


def expected_outputs(seq: Sequence) -> list[int]:
    return [fake_token(seq.seq_id, i) for i in range(seq.max_tokens)]


def check_plan(sched: ContinuousScheduler, plan: StepPlan, known: Iterable[Sequence]) -> None:
    """Per-step invariants: limits, budget order, one work item per seq, chunk positions and
    sizes, block tables holding exactly what is computed. ``known``: every sequence added."""
    ids = [w.seq_id for w in plan.prefills] + [w.seq_id for w in plan.decodes]
    assert len(ids) == len(set(ids)), "a seq scheduled twice in one step"
    assert not set(ids) & set(plan.preempted)
    assert sched.num_running <= sched.max_num_seqs
    assert plan.num_tokens <= sched.max_step_tokens
    for p in plan.prefills:
        seq = sched.get(p.seq_id)
        assert seq is not None and seq.status == SeqStatus.PREFILLING
        assert p.start_pos == seq.num_computed
        assert 1 <= len(p.token_ids) <= sched.prefill_chunk_tokens
        assert p.token_ids == seq.token_ids[p.start_pos : p.end]
        assert p.final == (p.end == len(seq.token_ids))
        assert len(p.block_table) == sched.kv.blocks_needed(p.end)  # allocated as it goes
    for d in plan.decodes:
        seq = sched.get(d.seq_id)
        assert seq is not None and seq.status == SeqStatus.RUNNING
        assert d.token_id == seq.token_ids[-1] and d.pos == len(seq.token_ids) - 1
        assert len(d.block_table) == sched.kv.blocks_needed(d.pos + 1)
    decoding = {s.seq_id for s in known if s.status == SeqStatus.RUNNING}
    assert decoding <= {d.seq_id for d in plan.decodes}, "a running seq missed its decode"
    if plan.num_tokens < sched.max_step_tokens:  # budget left: every prefill got its chunk
        assert len(ids) == sched.num_running
    assert plan.sampled == [p.seq for p in plan.prefills if p.final] + [d.seq for d in plan.decodes]


def step(sched: ContinuousScheduler, plan: StepPlan) -> list[Sequence]:
    """Fake-sample the plan's sampled sequences and record the step."""
    sampled = {s.seq_id: fake_token(s.seq_id, len(s.output_ids)) for s in plan.sampled}
    return sched.on_step(sampled)


def run_to_completion(
    sched: ContinuousScheduler,
    seqs: Iterable[Sequence] = (),
    *,
    arrivals: dict[int, list[Sequence]] | None = None,
    dt: float = 1.0,
    max_steps: int = 5_000,
) -> list[StepPlan]:
    """Drive schedule/on_step with fake sampling until no work is left; return every plan."""
    known = list(seqs)
    for seq in known:
        sched.add(seq)
    arrivals = dict(arrivals or {})
    plans: list[StepPlan] = []
    for n in range(max_steps):
        for seq in arrivals.pop(n, []):
            sched.add(seq)
            known.append(seq)
        if not sched.has_work and not arrivals:
            return plans
        plan = sched.schedule(n * dt)
        check_plan(sched, plan, known)
        plans.append(plan)
        for seq in step(sched, plan):
            assert seq.status == SeqStatus.FINISHED and seq.output_ids == expected_outputs(seq)
    raise AssertionError("did not finish")


def make(seq_id: str, n: int, max_tokens: int = 4, *, base: int = 0, **kw) -> Sequence:
    return Sequence(seq_id, [base + i for i in range(n)], max_tokens, **kw)


def prefill_tokens(plans: list[StepPlan]) -> int:
    return sum(len(p.token_ids) for plan in plans for p in plan.prefills)
