"""Continuous batching over a paged, prefix-cached KV cache, with chunked prefill.

Each step spends a token budget (``max_step_tokens``): first one token for every running
sequence's decode, then the next chunk of every sequence in the middle of its prefill, then
the first chunk of the waiting sequences it admits. A chunk is at most
``prefill_chunk_tokens`` and what is left of the budget, so a long prompt spans several steps
and the running sequences never wait behind it for a whole prefill. A sequence's KV blocks
are allocated chunk by chunk; when the pool runs short, the least urgent sequence is preempted
and recomputed later. Pure Python; the caller passes ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from scheduler.plan import DecodeWork, PrefillWork, StepPlan
from scheduler.sequence import SeqStatus, Sequence
from scheduler.speculation import Speculation

if TYPE_CHECKING:
    from kv.manager import KVCacheManager

Urgency = Callable[[Sequence], tuple[int, float, str]]


class ContinuousScheduler:
    """Plans prefill/decode steps over a :class:`KVCacheManager`.

    Urgency is the effective class (priority + one per full ``aging_s`` waited since arrival),
    then arrival. Waiting sequences are admitted in the order (effective class, longest cached
    prefix, shortest prompt): this order IS the design's length-sorted micro-batching, done
    per step instead of per static batch: within a class, jobs sharing a cached prefix go
    together, then short prompts before long ones. Admission is head-of-line: when the next
    candidate does not get blocks or the step's budget is spent, nobody behind it is admitted
    this step, so big or old jobs are not starved by a stream of small ones.

    A running sequence is PREFILLING until its final chunk is computed (and sampled), then
    RUNNING (decoding); both hold blocks and count against ``max_num_seqs``.
    """

    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_num_seqs: int,
        max_step_tokens: int,
        prefill_chunk_tokens: int,
        aging_s: float,
        speculation: Speculation | None = None,
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_step_tokens", max_step_tokens),
            ("prefill_chunk_tokens", prefill_chunk_tokens),
            ("aging_s", aging_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.aging_s = aging_s
        self.speculation = speculation  # None: no drafting
        self._waiting: dict[str, Sequence] = {}
        self._running: dict[str, Sequence] = {}  # PREFILLING or RUNNING: they hold blocks
        self._in_plan: list[PrefillWork | DecodeWork] = []  # the last plan, awaiting on_step

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

    def _urgency(self, now: float) -> Urgency:
        """Sort key: most urgent first (effective class desc, then arrival, then id)."""
        return lambda s: (-self._class(s, now), s.arrival, s.seq_id)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Free ``seq``'s blocks and requeue it; its outputs are kept and recomputed later
        (its computed full blocks stay in the prefix cache, so little may be recomputed)."""
        self.kv.free(seq.seq_id)
        del self._running[seq.seq_id]
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.preemptions += 1
        self._waiting[seq.seq_id] = seq
        plan.preempted.append(seq.seq_id)

    def _room(
        self, seq: Sequence, num_tokens: int, plan: StepPlan, key: Urgency, planned: set[str]
    ) -> bool:
        """Blocks for the first ``num_tokens`` of ``seq``: while short, preempt the least
        urgent running sequence not planned yet this step (maybe ``seq`` itself, then False)."""
        while not self.kv.append_slots(seq.seq_id, num_tokens, seq.token_ids):
            victim = max((s for s in self._running.values() if s.seq_id not in planned), key=key)
            self._preempt(victim, plan)
            if victim is seq:
                return False
        planned.add(seq.seq_id)
        return True

    def _draft(self, spec: Speculation, work: DecodeWork, spare: int) -> DecodeWork:
        """``work`` with tokens to verify after its token, their KV slots allocated; as it
        was when its sequence has no good guess, the step's budget or the free blocks are
        short, or it is one token from ``max_tokens``."""
        seq = work.seq
        if seq.drafts is None:
            seq.drafts = spec.new_drafts()
        most = min(spare, seq.max_tokens - seq.num_outputs - 1)
        draft = spec.draft(seq.drafts, seq.token_ids, most)
        ids = seq.token_ids
        if not draft or not self.kv.append_slots(seq.seq_id, len(ids) + len(draft), ids):
            return work
        return replace(work, block_table=self.kv.block_table(seq.seq_id), draft=tuple(draft))

    @staticmethod
    def _chunk(seq: Sequence, start: int, n: int, table: list[int]) -> PrefillWork:
        """Tokens ``start .. start + n`` of ``seq``; final when they reach its last token."""
        end = start + n
        ids = seq.token_ids
        return PrefillWork(seq, ids[start:end], start, table, final=end == len(ids))

    def schedule(self, now: float) -> StepPlan:
        """Plan one step: a decode for every running sequence, then the next chunk of each
        prefilling one, then first chunks of admissions, all under the step's token budget."""
        plan = StepPlan()
        key = self._urgency(now)
        by_urgency = sorted(self._running.values(), key=key)
        planned: set[str] = set()
        decoding = [s for s in by_urgency if s.status is SeqStatus.RUNNING]
        spec = self.speculation
        if spec is not None and len(decoding) > spec.max_running:
            spec = None  # a big batch is compute-bound: drafts would slow it down
        spare = self.max_step_tokens - len(decoding)  # budget beyond one token per decode
        for seq in decoding:  # decodes first, one token each (unless preempted in this loop)
            ids = seq.token_ids
            if seq.status is SeqStatus.RUNNING and self._room(seq, len(ids), plan, key, planned):
                table = self.kv.block_table(seq.seq_id)
                plan.decodes.append(DecodeWork(seq, ids[-1], len(ids) - 1, table))
        if spec is not None:  # then drafts, from what is left: they never preempt anyone
            for i, work in enumerate(plan.decodes):
                plan.decodes[i] = work = self._draft(spec, work, spare)
                spare -= len(work.draft)
        left = self.max_step_tokens - sum(d.num_tokens for d in plan.decodes)
        for seq in by_urgency:  # then the prompts already in the middle of their prefill
            if left <= 0:
                break
            if seq.status is not SeqStatus.PREFILLING:
                continue  # decoding, or preempted above
            start = seq.num_computed
            n = min(len(seq.token_ids) - start, self.prefill_chunk_tokens, left)
            if self._room(seq, start + n, plan, key, planned):
                plan.prefills.append(self._chunk(seq, start, n, self.kv.block_table(seq.seq_id)))
                left -= n
        if not plan.preempted:  # under memory pressure, admit nobody (avoids thrashing)
            self._admit(plan, now, left)
        self._in_plan = [*plan.prefills, *plan.decodes]
        return plan

    def _admit(self, plan: StepPlan, now: float, left: int) -> None:
        """Admit waiting sequences in urgency/prefix order, head-of-line, each with a first
        chunk of at most ``prefill_chunk_tokens`` of the ``left`` tokens of the budget."""
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
        # Each running seq decodes one token per step, so the decodes alone fit the budget.
        cap = min(self.max_num_seqs, self.max_step_tokens)
        admitted = False
        for seq in order:
            if len(self._running) >= cap or left <= 0:
                break
            ids = seq.token_ids
            # Admissions earlier in this step may have made part of this prefix pending.
            probe = kv.probe(ids, seq.salt, seq.block_hashes) if admitted else probes[seq.seq_id]
            if probe.pending_tokens > 0:
                continue  # its prefix is being computed this step: share it next step
            most = min(self.prefill_chunk_tokens, left)
            alloc = kv.allocate(seq.seq_id, ids, seq.salt, seq.block_hashes, most)
            if alloc is None:
                break
            del self._waiting[seq.seq_id]
            self._running[seq.seq_id] = seq
            seq.status = SeqStatus.PREFILLING
            seq.num_cached = seq.num_computed = start = alloc.num_cached_tokens
            n = min(len(ids) - start, most)
            plan.prefills.append(self._chunk(seq, start, n, list(alloc.block_ids)))
            left -= n
            admitted = True

    def on_step(self, sampled: Mapping[str, int | list[int]]) -> list[Sequence]:
        """Record the last plan as computed, with the tokens sampled for each sequence it
        sampled (`StepPlan.sampled`): one, or for a decode with drafts the drafts the model
        agreed with and the token after them. Return those that finished (as
        `Sequence.append` decides), their blocks freed. A chunk before a prompt's last is
        committed and sampled nothing. A rejected draft's KV slots stay in the table, past
        the tokens computed: the next step writes over them, and only full blocks of kept
        tokens are ever hashed."""
        done: list[Sequence] = []
        for work in self._in_plan:
            seq = work.seq
            if self._running.get(seq.seq_id) is not seq:
                continue  # aborted since the plan was made
            got = sampled.get(seq.seq_id)
            sampling = isinstance(work, DecodeWork) or work.final
            if sampling and got is None:
                continue  # the caller dropped it (its row failed): nothing is recorded
            tokens = [] if not sampling or got is None else [got] if isinstance(got, int) else got
            end = work.end + self._accepted(work, len(tokens) - 1)
            finished = False
            for token in tokens:
                seq.status = SeqStatus.RUNNING
                if finished := seq.append(token):
                    break
            end = min(end, len(seq.token_ids))  # an end-of-sequence token is not kept
            seq.computed_tokens += end - seq.num_computed
            seq.num_computed = end
            self.kv.commit(seq.seq_id, seq.token_ids, end)
            if finished:
                self.kv.free(seq.seq_id)
                del self._running[seq.seq_id]
                seq.status = SeqStatus.FINISHED
                done.append(seq)
        self._in_plan = []
        return done

    @staticmethod
    def _accepted(work: PrefillWork | DecodeWork, accepted: int) -> int:
        """Count a decode's verified drafts; the number of them whose KV is kept."""
        if not isinstance(work, DecodeWork) or not work.draft:
            return 0
        seq = work.seq
        seq.draft_tokens += len(work.draft)
        seq.accepted_tokens += accepted
        if seq.drafts is not None:
            seq.drafts.record(len(work.draft), accepted)
        return accepted
