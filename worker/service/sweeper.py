"""The sweeper: this worker's heartbeat, and jobs sent again when their message was lost.

Every worker runs one; their work is idempotent (a job is marked `requeued_at` in the same
statement that selects it, so two sweepers never both send it), and a duplicate message is
harmless anyway (one result per job, the rest acknowledged).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from api_client.schema import MAX_TTL_S, JobMessage
from api_client.wire import producer_app, send_job
from inferq.logs import get_logger
from inferq.settings import Settings, is_redis_url
from storage.records import as_utc
from storage.repository import Repository
from storage.sweeps import StrandedJob, Sweeps
from worker.broker import queue_depth
from worker.service.metrics import Metrics
from worker.service.priority import as_helper_thread

log = get_logger("inferq.sweeper")
EXPIRED_TTL_S = 1e-3  # a resent job past its deadline: the worker that takes it expires it


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        repo: Repository,
        worker: str,
        models: list[str],
        metrics: Metrics,
        held: Callable[[], int],
        ended: Callable[[list[uuid.UUID]], None] | None = None,
    ):
        self.settings, self.worker, self.models = settings, worker, models
        self.metrics, self._held = metrics, held
        self._ended = ended  # told the jobs a sweep expired or failed
        self.last_ok = 0.0  # monotonic time of the last sweep that reached the database
        url = settings.resolved_broker_url
        self._broker = redis.Redis.from_url(url) if is_redis_url(url) else None
        self.sweeps = Sweeps(repo)
        self.producer = producer_app(settings)
        self.signing_keys = settings.signing_keys()
        self._created = time.monotonic()  # before this process claims anything
        self.started_at: datetime | None = None  # on the database's clock, at the first beat
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="inferq-sweeper", daemon=True)

    def start(self) -> None:
        """Beat once (so the intake's first claims find this worker alive), then run."""
        try:
            self._beat()
        except Exception as exc:  # the thread retries every heartbeat_s
            log.warning("sweeper.first_heartbeat_failed", error=type(exc).__name__)
        self.thread.start()

    def _beat(self, stopped: bool = False) -> None:
        self.started_at = self.sweeps.heartbeat(
            self.worker,
            self.models,
            self.started_at,
            stopped=stopped,
            age_s=time.monotonic() - self._created,
        )

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.thread.join(timeout)
        try:
            self._beat(stopped=True)
        except Exception as exc:
            log.warning("sweeper.final_heartbeat_failed", error=type(exc).__name__)

    def _run(self) -> None:
        as_helper_thread()
        while True:
            self.metrics.held.set(self._held())
            try:
                self.sweep()
                self.last_ok = time.monotonic()
            except Exception as exc:  # the next tick retries: the interval is the backoff
                self.metrics.retries.labels("sweeper").inc()
                log.warning("sweeper.failed", error=type(exc).__name__)
            if self._stop.wait(self.settings.heartbeat_s):
                return

    def sweep(self) -> int:
        """One heartbeat and one requeue pass; returns how many jobs were sent again."""
        s = self.settings
        self._beat()
        if self._broker is not None:
            self.metrics.queue_depth.set(queue_depth(self._broker, s.queue))
        stranded = self.sweeps.requeue(
            s.worker_dead_after_s, s.requeue_after_s, max_resends=s.max_resends
        )
        if self.sweeps.ended and self._ended is not None:
            self._ended(self.sweeps.ended)
        for job in stranded:
            self._send(job)
        if stranded:
            log.warning("sweeper.requeued", jobs=len(stranded))
        return len(stranded)

    def _send(self, job: StrandedJob) -> None:
        """Send a lost job again, signed with its tenant's first key when it has one, sent
        now (a signed message must be fresh) with the same deadline."""
        now = datetime.now(UTC)
        left = job.expires_at and (as_utc(job.expires_at) - now).total_seconds()
        message = JobMessage(
            job_id=job.id,
            tenant=job.tenant,
            model=job.model,
            prompt=job.prompt,
            messages=job.messages,
            params=job.params,
            priority=job.priority,
            idempotency_key=job.idempotency_key,
            submitted_at=now,
            ttl_s=left if left is None else min(max(left, EXPIRED_TTL_S), MAX_TTL_S),
            callback_url=job.callback_url,
        )
        key = self.signing_keys.get(job.tenant, (None,))[0]
        send_job(self.producer, self.settings.queue, message, key)
