"""Continuous batching over a paged, prefix-cached KV cache.

Each step first gives every running sequence a KV slot for its next decode token (preempting
the least urgent sequence when the pool is full), then admits waiting sequences for prefill
under a sequence cap and a per-step token budget. Pure Python; the caller passes ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scheduler.sequence import SeqStatus, Sequence

if TYPE_CHECKING:
    from kv.manager import KVCacheManager


@dataclass(frozen=True)
class PrefillWork:
    """Compute ``token_ids`` at positions ``start_pos..``; context = start_pos + len(token_ids)."""

    seq: Sequence
    token_ids: list[int]
    start_pos: int
    block_table: list[int]

    @property
    def seq_id(self) -> str:
        return self.seq.seq_id


@dataclass(frozen=True)
class DecodeWork:
    """Feed the last sampled token ``token_id`` at position ``pos``."""

    seq: Sequence
    token_id: int
    pos: int
    block_table: list[int]

    @property
    def seq_id(self) -> str:
        return self.seq.seq_id


@dataclass
class StepPlan:
    """What the model runner computes in one step, plus the sequences preempted for it."""

    prefills: list[PrefillWork] = field(default_factory=list)
    decodes: list[DecodeWork] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens fed to the model: all prefill tokens plus one per decode."""
        return sum(len(p.token_ids) for p in self.prefills) + len(self.decodes)

    @property
    def empty(self) -> bool:
        """True when there is nothing to compute."""
        return not self.prefills and not self.decodes

    @property
    def seqs(self) -> list[Sequence]:
        """The sequences computed in this step: prefills first, then decodes (logits order)."""
        return [w.seq for w in self.prefills] + [w.seq for w in self.decodes]


class ContinuousScheduler:
    """Plans prefill/decode steps over a :class:`KVCacheManager`.

    Urgency is the effective class (priority + one per full ``aging_s`` waited since arrival),
    then arrival. Waiting sequences are admitted in the order (effective class, longest cached
    prefix, shortest prompt): this order IS the design's length-sorted micro-batching, done
    per step instead of per static batch: within a class, jobs sharing a cached prefix go
    together, then short prompts before long ones. Admission is head-of-line: when the next
    candidate does not fit the blocks or the token budget, nobody behind it is admitted this
    step, so big or old jobs are not starved by a stream of small ones.
    """

    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_num_seqs: int = 64,
        max_step_tokens: int = 2048,
        aging_s: float = 5.0,
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_step_tokens", max_step_tokens),
            ("aging_s", aging_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens
        self.aging_s = aging_s
        self._waiting: dict[str, Sequence] = {}
        self._running: dict[str, Sequence] = {}
        self._in_plan: list[Sequence] = []  # computed by the last plan, awaiting on_step

    # -- queue -----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def get(self, seq_id: str) -> Sequence | None:
        """The waiting or running sequence ``seq_id``, else None."""
        return self._waiting.get(seq_id) or self._running.get(seq_id)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; ValueError if it is empty, a duplicate, or can never fit the pool."""
        if not seq.token_ids:
            raise ValueError(f"seq {seq.seq_id!r}: empty prompt")
        if seq.max_tokens < 1:
            raise ValueError(f"seq {seq.seq_id!r}: max_tokens must be >= 1")
        if seq.seq_id in self._waiting or seq.seq_id in self._running:
            raise ValueError(f"duplicate seq_id {seq.seq_id!r}")
        if not self.kv.can_fit(seq.num_prompt_tokens + seq.max_tokens):
            raise ValueError(f"seq {seq.seq_id!r}: prompt + max_tokens can never fit the KV pool")
        seq.status = SeqStatus.WAITING
        self._waiting[seq.seq_id] = seq

    def abort(self, seq_id: str) -> None:
        """Drop a waiting or running sequence and free its blocks (unknown ids are ignored)."""
        seq = self._waiting.pop(seq_id, None)
        if seq is None:
            seq = self._running.pop(seq_id, None)
            if seq is None:
                return
            self.kv.free(seq_id)
        seq.status = SeqStatus.FINISHED

    # -- planning --------------------------------------------------------------------------

    def _class(self, seq: Sequence, now: float) -> int:
        """Priority plus one class per full ``aging_s`` waited (future arrival counts as 0)."""
        return seq.priority + math.floor(max(0.0, now - seq.arrival) / self.aging_s)

    def _urgency(self, now: float) -> Callable[[Sequence], tuple[int, float, str]]:
        """Sort key: most urgent first (effective class desc, then arrival, then id)."""
        return lambda s: (-self._class(s, now), s.arrival, s.seq_id)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Free ``seq``'s blocks and requeue it; its outputs are kept and recomputed later."""
        self.kv.free(seq.seq_id)
        del self._running[seq.seq_id]
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.preemptions += 1
        self._waiting[seq.seq_id] = seq
        plan.preempted.append(seq.seq_id)

    def _over_budget(self, tokens: int, uncached: int, plan: StepPlan) -> bool:
        """Whether adding a prefill of ``uncached`` tokens breaks the step budget.

        A prefill larger than the whole budget is allowed when it is the step's only prefill.
        """
        if tokens + uncached <= self.max_step_tokens:
            return False
        return bool(plan.prefills) or uncached <= self.max_step_tokens

    def schedule(self, now: float) -> StepPlan:
        """Plan one step: decodes for every running sequence, then prefills for admissions."""
        plan = StepPlan()
        by_urgency = sorted(self._running.values(), key=self._urgency(now))
        for seq in by_urgency:
            if seq.seq_id not in self._running:
                continue  # preempted earlier in this loop
            ids = seq.token_ids
            while not self.kv.append_slots(seq.seq_id, len(ids)):
                victim = max(self._running.values(), key=self._urgency(now))
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.seq_id in self._running:
                table = self.kv.block_table(seq.seq_id)
                plan.decodes.append(DecodeWork(seq, ids[-1], len(ids) - 1, table))
        if not plan.preempted:  # under memory pressure, admit nobody (avoids thrashing)
            self._admit(plan, now)
        self._in_plan = plan.seqs
        return plan

    def _admit(self, plan: StepPlan, now: float) -> None:
        """Admit waiting sequences for prefill in urgency/prefix order, head-of-line."""
        kv = self.kv
        probes = {
            s.seq_id: kv.probe(s.token_ids, s.salt, s.block_hashes) for s in self._waiting.values()
        }
        order = sorted(
            self._waiting.values(),
            key=lambda s: (
                -self._class(s, now),
                -probes[s.seq_id].cached_tokens,
                len(s.token_ids),
                s.arrival,
                s.seq_id,
            ),
        )
        tokens = len(plan.decodes)
        # Each running seq decodes one token per step, so the decodes alone fit the budget.
        cap = min(self.max_num_seqs, self.max_step_tokens)
        for seq in order:
            if len(self._running) >= cap:
                break
            ids = seq.token_ids
            # Admissions earlier in this step may have made part of this prefix pending.
            probe = (
                kv.probe(ids, seq.salt, seq.block_hashes) if plan.prefills else probes[seq.seq_id]
            )
            if probe.pending_tokens > 0:
                continue  # its prefix is being computed this step: share it next step
            uncached = len(ids) - min(probe.cached_tokens, len(ids) - 1)
            if self._over_budget(tokens, uncached, plan):
                break
            alloc = kv.allocate(seq.seq_id, ids, seq.salt, seq.block_hashes)
            if alloc is None:
                break
            uncached = len(ids) - alloc.num_cached_tokens
            if self._over_budget(tokens, uncached, plan):  # fewer cached than probed
                kv.free(seq.seq_id)
                break
            del self._waiting[seq.seq_id]
            self._running[seq.seq_id] = seq
            seq.status = SeqStatus.RUNNING
            seq.num_cached = seq.num_computed = start = alloc.num_cached_tokens
            plan.prefills.append(PrefillWork(seq, ids[start:], start, list(alloc.block_ids)))
            tokens += uncached

    def on_step(self, sampled: dict[str, int]) -> list[Sequence]:
        """Record one sampled token per sequence of the last plan; return those that finished
        (as `Sequence.append` decides), their blocks freed."""
        done: list[Sequence] = []
        for seq in self._in_plan:
            token = sampled.get(seq.seq_id)
            if token is None or self._running.get(seq.seq_id) is not seq:
                continue  # aborted since the plan was made
            computed = len(seq.token_ids)
            seq.computed_tokens += computed - seq.num_computed
            seq.num_computed = computed
            finished = seq.append(token)
            self.kv.commit(seq.seq_id, seq.token_ids, computed)
            if finished:
                self.kv.free(seq.seq_id)
                del self._running[seq.seq_id]
                seq.status = SeqStatus.FINISHED
                done.append(seq)
        self._in_plan = []
        return done
