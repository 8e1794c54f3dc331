"""The result sink: the only writer of results, metrics and batch rows.

It gathers outcomes into one transaction at a time, at most one per `commit_interval_s`
(under load the outcomes of several engine steps share one: a transaction is about a dozen
round trips, whatever it carries; after a quiet spell the first outcome is written at once),
retries with backoff while the database is away (running sequences are not touched: a
database outage only delays results), asks the intake to acknowledge messages once their
outcome is committed, and checks live jobs for cancellation.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from inferq.logs import get_logger
from storage.errors import is_transient
from storage.records import BatchRecord, EndedJob, JobStatus, JobView, utcnow
from storage.repository import Repository
from worker.service.jobs import Ledger
from worker.service.metrics import Metrics
from worker.service.outcomes import Dropped, Failed, Finished, Outcome
from worker.service.priority import as_helper_thread
from worker.service.retry import Backoff
from worker.service.usage import UsageReport

log = get_logger("inferq.sink")
CANCEL_CHECK_S = 5.0  # a cancel written to the database (requests come by notification)
IDLE_WAKE_S = 0.5  # an idle sink looks at `stop` this often
MAX_OPEN_BATCHES = 4096  # batch rows still gathering members (oldest forgotten first)
MAX_PER_WRITE = 128


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def ended_job(done: Finished, worker: str, device: str, batch_id: uuid.UUID | None) -> EndedJob:
    """A finished job's record: its output and what the engine measured (times are the
    engine's wall clock)."""
    out, job = done.output, done.job
    return EndedJob(
        job_id=job.seq_id,
        model=job.model,
        worker=worker,
        device=device,
        finished_at=_at(out.finished_at),
        compute_s=out.compute_s,
        text=out.text,
        finish_reason=out.finish_reason.value,
        batch_id=batch_id,
        enqueued_at=job.enqueued_at,
        admitted_at=_at(out.admitted_at),
        first_token_at=_at(out.first_token_at),
        prompt_tokens=out.prompt_tokens,
        cached_prompt_tokens=out.cached_tokens,
        computed_prompt_tokens=out.computed_prompt_tokens,
        completion_tokens=len(out.token_ids),
        spec_drafted_tokens=out.draft_tokens,
        spec_accepted_tokens=out.accepted_tokens,
    )


def _may_owe_webhook(outcome: Outcome) -> bool:
    """A finished job owes one only with a callback URL; a job that ended otherwise (failed,
    expired, dropped) may owe one whatever its message said; a usage report never does."""
    if isinstance(outcome, Finished):
        return outcome.job.callback
    return not isinstance(outcome, UsageReport)


class ResultSink:
    """`put` outcomes from any thread; `acknowledge(job_ids, views, owed)` is called after
    each commit, with the jobs as the commit left them (those it has: views of the others
    are read again where needed), `owed` False when no job of the commit can owe a webhook
    (each finished with a result and without a callback URL)."""

    def __init__(
        self,
        repo: Repository,
        ledger: Ledger,
        worker: str,
        acknowledge: Callable[[list[uuid.UUID], dict[uuid.UUID, JobView], bool], None],
        abort: Callable[[uuid.UUID], None],
        metrics: Metrics,
        devices: dict[str, str] | None = None,
        *,
        commit_interval_s: float = 0.0,
    ):
        self.repo, self.ledger, self.worker, self.metrics = repo, ledger, worker, metrics
        self.devices = devices or {}  # device class per model, for compute rates
        self.commit_interval_s = commit_interval_s
        self._last_write = -commit_interval_s  # monotonic: when the last write began
        self._acknowledge, self._abort = acknowledge, abort
        self._inbox: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._batches: OrderedDict[tuple[str, int], BatchRecord] = OrderedDict()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a commit window ends early: stopping, or a full write
        self._abandon = threading.Event()  # set when stop() gives up on a failing database
        self._backoff = Backoff()
        self._next_cancel_check = 0.0
        self.thread = threading.Thread(target=self._run, name="inferq-sink", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is pending (retrying until `timeout`), then stop."""
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout)
        self._abandon.set()

    def put(self, outcome: Outcome) -> None:
        self._inbox.put(outcome)
        if self._inbox.qsize() >= MAX_PER_WRITE:
            self._wake.set()

    def _run(self) -> None:
        as_helper_thread()
        pending: list[Outcome] = []
        touched: set[tuple[str, int]] = set()
        while True:
            due = max(0.0, self._next_cancel_check - time.monotonic())
            wait = 0.0 if pending else min(due, IDLE_WAKE_S)
            self._gather(pending, touched, wait)
            until = self._last_write + self.commit_interval_s
            full = len(pending) >= MAX_PER_WRITE
            if pending and not full and (left := until - time.monotonic()) > 0:
                # what comes meanwhile shares the write: slept through, not woken for each
                # outcome (every wake takes the GIL from the engine's thread), unless a full
                # write's worth is waiting
                self._wake.wait(left)
                if not self._stop.is_set():
                    self._wake.clear()
                self._gather(pending, touched, 0.0)
            if pending:
                self._last_write = time.monotonic()
                if not self._write(pending, touched):
                    if self._backoff.wait(self._abandon):
                        return
                    continue
                pending, touched = [], set()
            elif self._stop.is_set() and self._inbox.empty():
                return
            if time.monotonic() >= self._next_cancel_check:
                self._check_cancelled()

    def _gather(self, pending: list[Outcome], touched: set[tuple[str, int]], wait: float) -> None:
        """Add what the inbox has (waiting up to `wait` for the first) to `pending`."""
        for outcome in self._take(wait, MAX_PER_WRITE - len(pending)):
            pending.append(outcome)
            if isinstance(outcome, Finished):
                touched.add(self._count_in_batch(outcome))

    def _take(self, wait: float, limit: int) -> list[Outcome]:
        try:
            first = self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return []
        taken = [first]
        while len(taken) < limit:
            try:
                taken.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return taken

    def _count_in_batch(self, done: Finished) -> tuple[str, int]:
        """Fold a finished job into its batch row (the jobs one engine step admitted)."""
        out, key = done.output, (done.job.model, done.output.batch)
        batch = self._batches.get(key)
        if batch is None:
            batch = BatchRecord(
                uuid.uuid4(),
                self.worker,
                done.job.model,
                out.batch_size,
                0,
                _at(out.admitted_at),
                stats={"cached_tokens": 0, "prompt_tokens": 0},
            )
            self._batches[key] = batch
            while len(self._batches) > MAX_OPEN_BATCHES:
                self._batches.popitem(last=False)
        batch.real_tokens += out.computed_tokens
        batch.started_at = min(batch.started_at, _at(out.admitted_at))
        batch.finished_at = max(batch.finished_at or batch.started_at, _at(out.finished_at))
        batch.duration_s = (batch.finished_at - batch.started_at).total_seconds()
        stats = batch.stats or {}
        stats["cached_tokens"] += out.cached_tokens
        stats["prompt_tokens"] += out.prompt_tokens
        stats.update(
            cache_hit_rate=round(done.stats.hit_rate, 4),
            blocks_used=done.stats.blocks_used,
            blocks_free=done.stats.blocks_free,
            blocks_evictable=done.stats.blocks_evictable,
            blocks_evicted=done.stats.evictions,
        )
        return key

    def _write(self, pending: list[Outcome], touched: set[tuple[str, int]]) -> bool:
        """One transaction for `pending`; True when committed (then messages are acked).
        What the database refuses (not transient) is written apart, so one bad row fails
        alone instead of blocking every result behind it."""
        finished, failures = self._rows(pending)
        expired = [o.job_id for o in pending if isinstance(o, Failed) and o.expired]
        charges = self._charges(pending)  # jobs that ended without a result
        usage = [d for o in pending if isinstance(o, UsageReport) for d in o.deltas]
        batches = [self._batches[k] for k in touched if k in self._batches]
        views: dict[uuid.UUID, JobView] = {}
        try:
            try:
                self.repo.store_outcomes(
                    finished + charges, batches, failures, expired, worker_usage=usage, views=views
                )
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.warning("sink.group_refused", error=type(exc).__name__)
                views.clear()  # rolled back: the rows written apart are read where needed
                self._write_apart(finished, batches, failures)
                self._store_or(
                    lambda: self.repo.store_outcomes(charges, expired=expired, worker_usage=usage),
                    "expired, charges and usage",
                )
        except Exception as exc:
            self.metrics.retries.labels("sink").inc()
            log.warning(
                "sink.write_failed",
                outcomes=len(pending),
                retry=self._backoff.failures + 1,
                error=type(exc).__name__,
            )
            return False
        self._backoff.reset()
        done_ids = [f.job_id for f in finished] + list(failures) + expired
        for job_id in done_ids:
            self.ledger.pop(job_id)
        owed = any(map(_may_owe_webhook, pending))
        self._acknowledge(done_ids, views, owed)  # first: waiters wake while this counts
        self._count(pending, finished, failures)
        for f in finished:
            log.info(
                "job.done",
                job_id=str(f.job_id),
                batch_id=str(f.batch_id),
                completion_tokens=f.completion_tokens,
            )
        for job_id, error in failures.items():
            log.warning("job.failed", job_id=str(job_id), error=error)
        for job_id in expired:
            log.info("job.expired", job_id=str(job_id))
        return True

    def _count(
        self, pending: list[Outcome], finished: list[EndedJob], failures: dict[uuid.UUID, str]
    ) -> None:
        m = self.metrics
        for o in pending:
            if isinstance(o, Failed):
                m.jobs.labels(o.model, "expired" if o.expired else "failed").inc()
        for f in finished:  # the rows just written: their timings are computed once
            m.jobs.labels(f.model, "failed" if f.job_id in failures else "done").inc()
            m.output_tokens.labels(f.model).inc(f.completion_tokens)
            m.spec_drafted_tokens.labels(f.model).inc(f.spec_drafted_tokens)
            m.spec_accepted_tokens.labels(f.model).inc(f.spec_accepted_tokens)
            facts = f.facts()
            for kind in ("queue_wait", "ttft", "total"):
                if facts[f"{kind}_s"] is not None:
                    m.latency.labels(f.model, kind).observe(facts[f"{kind}_s"])

    def _charges(self, pending: list[Outcome]) -> list[EndedJob]:
        """The compute of jobs that ended without a result (cancelled, expired, failed)."""
        return [
            EndedJob(
                o.job_id, o.model, self.worker, self.devices.get(o.model, ""), utcnow(), o.compute_s
            )
            for o in pending
            if isinstance(o, Dropped | Failed) and o.compute_s > 0
        ]

    def _rows(self, pending: list[Outcome]) -> tuple[list[EndedJob], dict[uuid.UUID, str]]:
        finished, failures = [], {}
        for o in pending:
            if isinstance(o, Failed) and not o.expired:
                failures[o.job_id] = o.error
            if isinstance(o, Finished):
                batch = self._batches.get((o.job.model, o.output.batch))
                device = self.devices.get(o.job.model, "")
                finished.append(ended_job(o, self.worker, device, batch.id if batch else None))
        return finished, failures

    def _write_apart(
        self,
        finished: list[EndedJob],
        batches: list[BatchRecord],
        failures: dict[uuid.UUID, str],
    ) -> None:
        """Row by row: a result the database refuses fails its job; a failure it refuses is
        logged and dropped. Transient errors still propagate (the whole write is retried)."""
        self._store_or(lambda: self.repo.store_outcomes([], batches), "batches")
        for f in finished:
            job_id = f.job_id
            if not self._store_or(lambda f=f: self.repo.store_outcomes([f]), str(job_id)):
                failures.setdefault(job_id, "the result could not be stored")
        for job_id, error in failures.items():
            self._store_or(lambda j=job_id, e=error: self.repo.fail_jobs({j: e}), str(job_id))

    def _store_or(self, write: Callable[[], object], what: str) -> bool:
        try:
            write()
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error("sink.row_refused", row=what, error=type(exc).__name__)
            return False
        return True

    def _check_cancelled(self) -> None:
        """Abort live jobs that were cancelled; their messages are acknowledged."""
        self._next_cancel_check = time.monotonic() + CANCEL_CHECK_S
        live = self.ledger.ids()
        if not live:
            return
        try:
            statuses = self.repo.statuses(live)
        except Exception as exc:
            log.warning("sink.cancel_check_failed", error=type(exc).__name__)
            return
        cancelled = [j for j in live if statuses.get(j) == JobStatus.CANCELLED]
        for job_id in cancelled:
            self._abort(job_id)
            self.ledger.pop(job_id)
            log.info("job.cancelled_while_running", job_id=str(job_id))
        if cancelled:
            self._acknowledge(cancelled, {}, True)
