"""The in-worker batcher: Celery task threads hand it jobs and wait on futures; one thread
owns the engine, forms micro-batches with `scheduler`, runs them and writes results in bulk."""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from api_client.schema import SamplingParams
from inferq.logs import get_logger
from inferq.settings import Settings
from scheduler import BatchPolicy, PendingJob, next_batch
from storage.records import BatchRecord, MetricsRow, ResultRow
from storage.repository import Repository
from worker.engine_api import BatchStats, Engine, EngineOutput, EngineRequest


@dataclass
class WorkItem:
    """A validated job waiting for a batch; `future` resolves to its final status."""

    job_id: uuid.UUID
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str
    priority: int
    queued_at: datetime
    arrived: float = field(default_factory=time.monotonic)
    future: Future[str] = field(default_factory=Future)


@dataclass
class Ran:
    output: EngineOutput
    engine_started: datetime


def _metrics(job_id: uuid.UUID, ran: Ran, queued_at: datetime, started_at: datetime) -> MetricsRow:
    out = ran.output
    first_token_at = ran.engine_started + timedelta(seconds=out.first_token_s)
    finished_at = first_token_at + timedelta(seconds=out.decode_s)
    decoded = max(len(out.token_ids) - 1, 0)
    return MetricsRow(
        job_id=job_id,
        queue_wait_s=(started_at - queued_at).total_seconds(),
        ttft_s=(first_token_at - queued_at).total_seconds(),
        prefill_s=out.first_token_s,
        decode_s=out.decode_s,
        total_s=(finished_at - queued_at).total_seconds(),
        decode_tokens_per_s=decoded / out.decode_s if out.decode_s > 0 else None,
    )


def _chain(source: Future[str], target: Future[str]) -> None:
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


class Batcher:
    """Owns the engine; call `submit` from any thread, `start` once, `stop` at shutdown."""

    def __init__(self, engine: Engine, repo: Repository, settings: Settings, worker: str):
        self.engine, self.repo, self.settings, self.worker = engine, repo, settings, worker
        self.policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            token_budget=settings.token_budget,
            aging_s=settings.aging_s,
        )
        self.log = get_logger("inferq.batcher", worker=worker)
        self._inbox: queue.Queue[WorkItem] = queue.Queue()
        self._pending: dict[str, WorkItem] = {}
        self._seq = itertools.count()
        self._seqs: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inferq-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, item: WorkItem) -> Future[str]:
        self._inbox.put(item)
        return item.future

    def _take(self, item: WorkItem) -> None:
        key = str(item.job_id)
        twin = self._pending.get(key)
        if twin is not None:  # the same job delivered twice: both wait on one run
            twin.future.add_done_callback(lambda done, dup=item.future: _chain(done, dup))
            return
        self._pending[key] = item
        self._seqs[key] = next(self._seq)

    def _gather(self) -> None:
        """Wait for a first job, then up to `batch_wait_ms` for the batch to fill."""
        if not self._pending:
            try:
                self._take(self._inbox.get(timeout=0.2))
            except queue.Empty:
                return
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(self._pending) < self.policy.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._take(self._inbox.get(timeout=remaining))
            except queue.Empty:
                break
        self._drain()

    def _drain(self) -> None:
        """Take everything already in the inbox, without waiting."""
        while True:
            try:
                self._take(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._gather()
            if not self._pending:
                continue
            jobs = [
                PendingJob(
                    key,
                    len(it.prompt_ids),
                    it.params.max_tokens,
                    it.priority,
                    it.arrived,
                    self._seqs[key],
                )
                for key, it in self._pending.items()
            ]
            chosen = next_batch(jobs, time.monotonic(), self.policy)
            items = [self._pending.pop(j.job_id) for j in chosen]
            for j in chosen:
                self._seqs.pop(j.job_id, None)
            try:
                self.run_batch(items)
            except Exception as exc:  # storage down or a bug: tasks requeue their messages
                self.log.exception("batch.error", error=str(exc))
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)

    def open_batch(self, items: list[WorkItem]) -> tuple[uuid.UUID, datetime, list[WorkItem]]:
        """Record a batch's start; settle at once the items that must not run (already final,
        cancelled, or out of attempts) and return the runnable rest."""
        batch_id, started_at = uuid.uuid4(), datetime.now(UTC)
        ids = [it.job_id for it in items]
        states = self.repo.start_batch(
            batch_id, self.worker, self.engine.model_name, ids, started_at
        )
        runnable, failures = [], {}
        for it in items:
            state = states.get(it.job_id)
            if state is None or state.status != "running":
                it.future.set_result(state.status if state else "missing")
            elif state.attempts > self.settings.max_attempts:
                failures[it.job_id] = (
                    f"gave up after {state.attempts - 1} attempts (a worker died running it)"
                )
            else:
                runnable.append(it)
        self.fail(items, failures)
        return batch_id, started_at, runnable

    def fail(self, items: list[WorkItem], failures: dict[uuid.UUID, str]) -> None:
        """Record final failures and release the tasks waiting on them."""
        if not failures:
            return
        self.repo.fail_jobs(failures, final=True)
        for it in items:
            if it.job_id in failures:
                it.future.set_result("failed")

    def complete(
        self,
        batch_id: uuid.UUID,
        record: BatchRecord,
        ran: dict[uuid.UUID, Ran],
        items: dict[uuid.UUID, WorkItem],
        started_at: datetime,
    ) -> None:
        """Write results and metrics of finished jobs in bulk, then release their tasks."""
        results = [
            ResultRow(
                job_id=job_id,
                text=r.output.text,
                finish_reason=r.output.finish_reason,
                prompt_tokens=r.output.prompt_tokens,
                completion_tokens=len(r.output.token_ids),
                cached_tokens=r.output.cached_tokens,
            )
            for job_id, r in ran.items()
        ]
        metrics = [_metrics(j, r, items[j].queued_at, started_at) for j, r in ran.items()]
        self.repo.finish_batch(batch_id, record, results, metrics)
        for job_id in ran:
            items[job_id].future.set_result("done")

    def run_batch(self, items: list[WorkItem]) -> None:
        """Record the start, run the engine (isolating crashing jobs), write results in bulk."""
        batch_id, started_at, runnable = self.open_batch(items)
        log = self.log.bind(batch_id=str(batch_id))
        ran, errors, stats = self._run_isolated(runnable, log)
        record = BatchRecord(
            size=len(runnable),
            real_tokens=stats.real_tokens,
            padded_tokens=stats.padded_tokens,
            finished_at=datetime.now(UTC),
            duration_s=stats.duration_s,
            stats={"engine_s": stats.duration_s, **stats.extra},
        )
        self.complete(batch_id, record, ran, {it.job_id: it for it in runnable}, started_at)
        self.fail(runnable, errors)
        waste = 1 - stats.real_tokens / stats.padded_tokens if stats.padded_tokens else 0.0
        log.info(
            "batch.done",
            size=len(runnable),
            skipped=len(items) - len(runnable),
            failed=len(errors),
            real_tokens=stats.real_tokens,
            padded_tokens=stats.padded_tokens,
            padding_waste=round(waste, 4),
            duration_s=round(stats.duration_s, 3),
        )

    def _run_isolated(self, items: list[WorkItem], log) -> tuple[dict, dict, BatchStats]:
        """Run `items`; if the batch raises, split it until each crashing job fails alone."""
        ran: dict[uuid.UUID, Ran] = {}
        errors: dict[uuid.UUID, str] = {}
        total = BatchStats(0, 0, 0, 0.0)
        todo = [items] if items else []
        while todo:
            group = todo.pop()
            requests = [
                EngineRequest(str(it.job_id), it.prompt_ids, it.params, it.tenant) for it in group
            ]
            engine_started = datetime.now(UTC)
            try:
                outputs, stats = self.engine.generate(requests)
            except Exception as exc:
                log.warning("batch.crashed", size=len(group), error=repr(exc))
                if len(group) == 1:
                    errors[group[0].job_id] = f"engine error: {exc!r}"
                else:
                    half = len(group) // 2
                    todo += [group[:half], group[half:]]
                continue
            for it, out in zip(group, outputs, strict=True):
                ran[it.job_id] = Ran(out, engine_started)
            total.size += stats.size
            total.real_tokens += stats.real_tokens
            total.padded_tokens += stats.padded_tokens
            total.duration_s += stats.duration_s
            for k, v in stats.extra.items():
                total.extra[k] = total.extra.get(k, 0.0) + v
        return ran, errors, total
