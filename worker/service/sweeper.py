"""The sweeper: this worker's heartbeat, and jobs sent again when their message was lost.

Every worker runs one; their work is idempotent (a job is marked `requeued_at` in the same
statement that selects it, so two sweepers never both send it), and a duplicate message is
harmless anyway (one result per job, the rest acknowledged).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from api_client.schema import JobMessage
from api_client.wire import TASK_NAME, celery_priority, producer_app
from inferq.logs import get_logger
from inferq.settings import Settings
from storage.records import utcnow
from storage.repository import Repository
from storage.sweeps import StrandedJob, Sweeps
from worker.service.metrics import Metrics
from worker.service.priority import as_helper_thread
from worker.service.redis_source import queue_depth

log = get_logger("inferq.sweeper")


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        repo: Repository,
        worker: str,
        models: list[str],
        metrics: Metrics,
        held: Callable[[], int],
    ):
        self.settings, self.worker, self.models = settings, worker, models
        self.metrics, self._held = metrics, held
        self.last_ok = 0.0  # monotonic time of the last sweep that reached the database
        url = settings.resolved_broker_url
        self._broker = (
            redis.Redis.from_url(url) if url.startswith(("redis://", "rediss://")) else None
        )
        self.sweeps = Sweeps(repo)
        self.producer = producer_app(settings)
        self.started_at = utcnow()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="inferq-sweeper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.thread.join(timeout)
        try:
            self.sweeps.heartbeat(self.worker, self.models, self.started_at, stopped=True)
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
        self.sweeps.heartbeat(self.worker, self.models, self.started_at)
        if self._broker is not None:
            self.metrics.queue_depth.set(queue_depth(self._broker, s.queue))
        stranded = self.sweeps.requeue(s.worker_dead_after_s, s.requeue_after_s)
        for job in stranded:
            self._send(job)
        if stranded:
            log.warning("sweeper.requeued", jobs=len(stranded))
        return len(stranded)

    def _send(self, job: StrandedJob) -> None:
        message = JobMessage(
            job_id=job.id, tenant=job.tenant, model=job.model, prompt=job.prompt,
            messages=job.messages, params=job.params, priority=job.priority,
            idempotency_key=job.idempotency_key, submitted_at=job.queued_at,
            ttl_s=job.expires_at and (job.expires_at - job.queued_at).total_seconds(),
        )  # fmt: skip
        self.producer.send_task(
            TASK_NAME,
            kwargs=message.to_wire(),
            queue=self.settings.queue,
            priority=celery_priority(job.priority),
        )
