"""Continuous batching in the worker: jobs join the engine's running set as they arrive, the
engine keeps stepping, and each step's finished jobs are written in bulk.

A "batch" row here is an admission group: the jobs that entered the engine together.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from storage.records import BatchRecord
from worker.batcher import Batcher, Ran, WorkItem
from worker.engine_api import EngineOutput, EngineRequest


@dataclass
class _Group:
    batch_id: uuid.UUID
    started_at: datetime
    items: dict[uuid.UUID, WorkItem]
    open: set[uuid.UUID]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    decoded_tokens: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    def record(self) -> BatchRecord:
        computed = self.prompt_tokens - self.cached_tokens + self.decoded_tokens
        finished = datetime.now(UTC)
        return BatchRecord(
            size=len(self.items),
            real_tokens=computed,
            padded_tokens=computed,
            finished_at=finished,
            duration_s=(finished - self.started_at).total_seconds(),
            stats={"cached_tokens": self.cached_tokens, **self.stats},
        )


CANCEL_CHECK_S = 0.5  # how often running jobs are checked for cancellation


class StreamingBatcher(Batcher):
    """For engines with `add`/`step`/`abort`/`has_work` (the paged engine)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._groups: dict[uuid.UUID, _Group] = {}
        self._group_of: dict[uuid.UUID, _Group] = {}
        self._entered: dict[uuid.UUID, datetime] = {}
        self._next_cancel_check = 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.engine.has_work:
                self._drain()  # never hold running sequences waiting for arrivals
            else:
                self._gather()
            arrivals = list(self._pending.values())
            self._pending.clear()
            self._seqs.clear()
            try:
                if arrivals:
                    self._admit(arrivals)
                if self.engine.has_work:
                    self._drop_cancelled()
                    self._step()
            except Exception as exc:  # storage down or a bug: tasks requeue their messages
                self.log.exception("engine.loop_error", error=repr(exc))
                self._abandon(exc, arrivals)

    def _admit(self, items: list[WorkItem]) -> None:
        batch_id, started_at, runnable = self.open_batch(items)
        group = _Group(batch_id, started_at, {}, set())
        refused = {}
        for it in runnable:
            request = EngineRequest(str(it.job_id), it.prompt_ids, it.params, it.tenant)
            try:
                self.engine.add(request, priority=it.priority)
            except ValueError as exc:
                refused[it.job_id] = f"cannot run: {exc}"
                continue
            group.items[it.job_id] = it
            group.open.add(it.job_id)
            group.prompt_tokens += len(it.prompt_ids)
            self._group_of[it.job_id] = group
            self._entered[it.job_id] = datetime.now(UTC)
        self.fail(runnable, refused)
        if group.items:
            self._groups[batch_id] = group

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._isolate(exc)
            return
        if outputs:
            self._finish(outputs)

    def _finish(self, outputs: list[EngineOutput]) -> None:
        by_group: dict[uuid.UUID, dict[uuid.UUID, Ran]] = {}
        for out in outputs:
            job_id = uuid.UUID(out.seq_id)
            group = self._group_of.pop(job_id)
            group.open.discard(job_id)
            group.cached_tokens += out.cached_tokens
            group.decoded_tokens += len(out.token_ids)
            ran = Ran(out, self._entered.pop(job_id))
            by_group.setdefault(group.batch_id, {})[job_id] = ran
        cache = self.engine.kv.stats()
        for batch_id, ran in by_group.items():
            group = self._groups[batch_id]
            group.stats = {
                "cache_hit_rate": round(cache.hit_rate, 4),
                "blocks_used": cache.num_used,
                "blocks_free": cache.num_free,
                "blocks_evictable": cache.num_evictable,
                "blocks_evicted": cache.evictions,
            }
            self.complete(batch_id, group.record(), ran, group.items, group.started_at)
            if not group.open:
                del self._groups[batch_id]
                self.log.info(
                    "batch.done",
                    batch_id=str(batch_id),
                    size=len(group.items),
                    cached_tokens=group.cached_tokens,
                    **group.stats,
                )

    def _drop_cancelled(self) -> None:
        """Every `CANCEL_CHECK_S`, abort live jobs that were cancelled while running."""
        now = time.monotonic()
        if now < self._next_cancel_check:
            return
        self._next_cancel_check = now + CANCEL_CHECK_S
        live = self._live_items()
        statuses = self.repo.statuses([it.job_id for it in live])
        cancelled = [it for it in live if statuses.get(it.job_id) == "cancelled"]
        self._forget(cancelled)
        for it in cancelled:
            it.future.set_result("cancelled")
            self.log.info("job.cancelled_while_running", job_id=str(it.job_id))

    def _live_items(self) -> list[WorkItem]:
        return [g.items[j] for g in self._groups.values() for j in g.open]

    def _forget(self, items: list[WorkItem]) -> None:
        for it in items:
            self.engine.abort(str(it.job_id))
            group = self._group_of.pop(it.job_id, None)
            self._entered.pop(it.job_id, None)
            if group is not None:
                group.open.discard(it.job_id)
                if not group.open:
                    self._groups.pop(group.batch_id, None)

    def _isolate(self, exc: Exception) -> None:
        """A step raised: rerun every live job apart (bisecting) so only the culprit fails."""
        items = self._live_items()
        self.log.warning("engine.step_crashed", live=len(items), error=repr(exc))
        groups = {it.job_id: self._group_of[it.job_id] for it in items}
        self._forget(items)
        ran, errors, _ = self._run_isolated(items, self.log)
        for job_id, r in ran.items():
            group = groups[job_id]
            self.complete(
                group.batch_id, group.record(), {job_id: r}, group.items, group.started_at
            )
        self.fail(items, errors)

    def _abandon(self, exc: Exception, arrivals: list[WorkItem]) -> None:
        """Release every waiting task with the error: their messages go back to the queue."""
        live = self._live_items()
        self._forget(live)
        for it in live + arrivals:
            if not it.future.done():
                it.future.set_exception(exc)
