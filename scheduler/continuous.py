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

if TYPE_CHECKING:
    from kv.manager import KVCacheManager


@dataclass
class SeqState:
    """One request's generation state as the scheduler tracks it."""

    seq_id: str
    prompt_ids: list[int]
    max_tokens: int
    priority: int = 0
    arrival: float = 0.0
    salt: str = ""
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV exists in the cache
    num_cached: int = 0  # prompt tokens served from the prefix cache at (last) admission
    status: str = "waiting"  # waiting | running | finished
    preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        """Prompt followed by the tokens generated so far."""
        return self.prompt_ids + self.output_ids


@dataclass(frozen=True)
class PrefillWork:
    """Compute ``token_ids`` at positions ``start_pos..``; context = start_pos + len(token_ids)."""

    seq_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]


@dataclass(frozen=True)
class DecodeWork:
    """Feed the last sampled token ``token_id`` at position ``pos``."""

    seq_id: str
    token_id: int
    pos: int
    block_table: list[int]


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


class ContinuousScheduler:
    """Plans prefill/decode steps over a :class:`KVCacheManager`.

    Urgency is the effective class (priority + one per full ``aging_s`` waited since arrival),
    then arrival. Admission is head-of-line: when the next candidate does not fit the blocks
    or the token budget, nobody behind it is admitted this step, so big or old jobs are not
    starved by a stream of small ones.
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
        self._waiting: dict[str, SeqState] = {}
        self._running: dict[str, SeqState] = {}
        self._in_plan: list[str] = []  # seq ids computed by the last plan, awaiting on_step

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

    def get(self, seq_id: str) -> SeqState | None:
        """The waiting or running sequence ``seq_id``, else None."""
        return self._waiting.get(seq_id) or self._running.get(seq_id)

    def add(self, seq: SeqState) -> None:
        """Queue ``seq``; ValueError if it is empty, a duplicate, or can never fit the pool."""
        if not seq.prompt_ids:
            raise ValueError(f"seq {seq.seq_id!r}: empty prompt")
        if seq.max_tokens < 1:
            raise ValueError(f"seq {seq.seq_id!r}: max_tokens must be >= 1")
        if seq.seq_id in self._waiting or seq.seq_id in self._running:
            raise ValueError(f"duplicate seq_id {seq.seq_id!r}")
        if not self.kv.can_fit(len(seq.prompt_ids) + seq.max_tokens):
            raise ValueError(f"seq {seq.seq_id!r}: prompt + max_tokens can never fit the KV pool")
        seq.status = "waiting"
        self._waiting[seq.seq_id] = seq

    def abort(self, seq_id: str) -> None:
        """Drop a waiting or running sequence and free its blocks (unknown ids are ignored)."""
        seq = self._waiting.pop(seq_id, None)
        if seq is None:
            seq = self._running.pop(seq_id, None)
            if seq is None:
                return
            self.kv.free(seq_id)
        seq.status = "finished"

    # -- planning --------------------------------------------------------------------------

    def _class(self, seq: SeqState, now: float) -> int:
        """Priority plus one class per full ``aging_s`` waited (future arrival counts as 0)."""
        return seq.priority + math.floor(max(0.0, now - seq.arrival) / self.aging_s)

    def _urgency(self, now: float) -> Callable[[SeqState], tuple[int, float, str]]:
        """Sort key: most urgent first (effective class desc, then arrival, then id)."""
        return lambda s: (-self._class(s, now), s.arrival, s.seq_id)

    def _preempt(self, seq: SeqState, plan: StepPlan) -> None:
        """Free ``seq``'s blocks and requeue it; its outputs are kept and recomputed later."""
        self.kv.free(seq.seq_id)
        del self._running[seq.seq_id]
        seq.status = "waiting"
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
            ids = seq.all_ids
            while not self.kv.append_slots(seq.seq_id, len(ids)):
                victim = max(self._running.values(), key=self._urgency(now))
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.seq_id in self._running:
                table = self.kv.block_table(seq.seq_id)
                plan.decodes.append(DecodeWork(seq.seq_id, ids[-1], len(ids) - 1, table))
        if not plan.preempted:  # under memory pressure, admit nobody (avoids thrashing)
            self._admit(plan, now)
        self._in_plan = [w.seq_id for w in plan.prefills] + [w.seq_id for w in plan.decodes]
        return plan

    def _admit(self, plan: StepPlan, now: float) -> None:
        """Admit waiting sequences for prefill in urgency/prefix order, head-of-line."""
        probes = {s.seq_id: self.kv.probe(s.all_ids, s.salt) for s in self._waiting.values()}
        order = sorted(
            self._waiting.values(),
            key=lambda s: (
                -self._class(s, now),
                -probes[s.seq_id].cached_tokens,
                len(s.prompt_ids) + len(s.output_ids),
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
            ids = seq.all_ids
            # Admissions earlier in this step may have made part of this prefix pending.
            probe = self.kv.probe(ids, seq.salt) if plan.prefills else probes[seq.seq_id]
            if probe.pending_tokens > 0:
                continue  # its prefix is being computed this step: share it next step
            uncached = len(ids) - min(probe.cached_tokens, len(ids) - 1)
            if self._over_budget(tokens, uncached, plan):
                break
            alloc = self.kv.allocate(seq.seq_id, ids, seq.salt)
            if alloc is None:
                break
            uncached = len(ids) - alloc.num_cached_tokens
            if self._over_budget(tokens, uncached, plan):  # fewer cached than probed
                self.kv.free(seq.seq_id)
                break
            del self._waiting[seq.seq_id]
            self._running[seq.seq_id] = seq
            seq.status = "running"
            seq.num_cached = alloc.num_cached_tokens
            start = alloc.num_cached_tokens
            plan.prefills.append(PrefillWork(seq.seq_id, ids[start:], start, list(alloc.block_ids)))
            tokens += uncached

    def on_step(self, sampled: dict[str, int], finished: set[str]) -> list[SeqState]:
        """Record one sampled token per sequence of the last plan; return those that finished.

        A sequence finishes when it is in ``finished`` or has ``max_tokens`` outputs.
        """
        done: list[SeqState] = []
        for seq_id in self._in_plan:
            seq = self._running.get(seq_id)
            if seq is None or seq_id not in sampled:
                continue  # aborted since the plan was made
            seq.num_computed = len(seq.prompt_ids) + len(seq.output_ids)
            seq.output_ids.append(sampled[seq_id])
            self.kv.commit(seq_id, seq.all_ids[: seq.num_computed])
            if seq_id in finished or len(seq.output_ids) >= seq.max_tokens:
                self.kv.free(seq_id)
                del self._running[seq_id]
                seq.status = "finished"
                done.append(seq)
        self._in_plan = []
        return done
