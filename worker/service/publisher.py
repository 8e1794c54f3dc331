"""The result publisher: writes jobs' states to Redis in Celery's result-backend format
(`api_client.results`), so Celery's `AsyncResult`, `InferqClient` and `AsyncInferqClient` get
them without the database.

`publish(job_ids)` from any thread (the intake once it has claimed jobs, the result sink after
each commit, the sweeper, the cancel listener); its own thread reads those jobs from the
database, the record (a result that raced a cancel is not the outcome: the job stays
cancelled), and writes each one's state: STARTED unless the key already holds an ended state
(one Lua script), an ended state with SET + PUBLISH on the key's own channel, as Celery's
`RedisBackend` does. Queued jobs get no key (Celery's PENDING). While the database or Redis is
away it retries with backoff; nothing a message holds decides what is written where: only
jobs stored in the database, under their own id.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterable

import redis

from api_client.results import (
    STARTED,
    SUCCESS,
    encode,
    result_key,
    stream_key,
    to_meta,
)
from inferq.logs import get_logger
from inferq.settings import Settings
from storage.records import JobState, JobStatus
from storage.repository import Repository
from worker.service.arrivals import Arrival, taken
from worker.service.metrics import Metrics
from worker.service.priority import as_helper_thread
from worker.service.retry import Backoff

log = get_logger("inferq.results")
MAX_PER_WRITE = 128  # jobs per write: the first ones of a large batch are out sooner
IDLE_WAIT_S = 0.5
# STARTED never replaces an ended state (a late claim on another worker, say).
SET_STARTED = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and (meta.status == 'SUCCESS' or meta.status == 'FAILURE'
      or meta.status == 'REVOKED') then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


def claimed_ids(
    arrivals: Iterable[Arrival], states: dict[uuid.UUID, JobState], worker: str
) -> list[uuid.UUID]:
    """The jobs of a claim whose state to publish: those now running here and those that
    have ended (before or in the claim), each only under its own id and only when the
    message is that stored job (never a message that names another tenant's job)."""
    ids: dict[uuid.UUID, None] = {}
    for arrival in arrivals:
        state = states.get(arrival.row.id)
        if state is None or state.id != arrival.row.id or taken(arrival, state):
            continue
        running_here = state.status == JobStatus.RUNNING and state.worker == worker
        if running_here or state.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            ids[state.id] = None
    return list(ids)


class ResultPublisher:
    def __init__(self, settings: Settings, repo: Repository, client: redis.Redis, metrics: Metrics):
        self.repo, self.client, self.metrics = repo, client, metrics
        self.expires_ms = int(settings.result_expires_s * 1000)
        self.stream_len = settings.max_new_tokens + 16
        self._set_started = client.register_script(SET_STARTED)
        self._inbox: queue.SimpleQueue[list[uuid.UUID]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._abandon = threading.Event()
        self.thread = threading.Thread(target=self._run, name="inferq-results", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is pending (retrying until `timeout`), then stop."""
        self._stop.set()
        self._inbox.put([])  # wakes the thread
        self.thread.join(timeout)
        self._abandon.set()

    def publish(self, job_ids: Iterable[uuid.UUID]) -> None:
        ids = list(job_ids)
        if ids:
            self._inbox.put(ids)

    def _run(self) -> None:
        as_helper_thread()
        pending: dict[uuid.UUID, None] = {}  # in order, once each
        backoff = Backoff()
        while True:
            self._take(pending, wait=not pending)
            if not pending:
                if self._stop.is_set() and self._inbox.empty():
                    return
                continue
            batch = list(pending)[:MAX_PER_WRITE]
            try:
                self.write(batch)
            except Exception as exc:
                self.metrics.retries.labels("results").inc()
                log.warning("results.write_failed", jobs=len(batch), error=type(exc).__name__)
                if backoff.wait(self._abandon):
                    return
                continue
            backoff.reset()
            for job_id in batch:
                del pending[job_id]

    def _take(self, pending: dict[uuid.UUID, None], wait: bool) -> None:
        try:
            ids = self._inbox.get(timeout=IDLE_WAIT_S) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            pending.update(dict.fromkeys(ids))
            try:
                ids = self._inbox.get_nowait()
            except queue.Empty:
                return

    def write(self, job_ids: list[uuid.UUID]) -> None:
        """Read the jobs' states from the database and write them, in one Redis round trip."""
        views = self.repo.get_many(job_ids)
        pipe = self.client.pipeline(transaction=False)
        for view in views.values():
            meta = to_meta(view)
            if meta is None:
                continue
            key, data = result_key(view.id), encode(meta)
            if meta["status"] == STARTED:
                self._set_started(keys=[key], args=[data, self.expires_ms], client=pipe)
                continue
            pipe.set(key, data, px=self.expires_ms)
            pipe.publish(key, data)
            if meta["status"] != SUCCESS:  # a stream being read ends here too
                pipe.xadd(
                    stream_key(view.id),
                    {"end": view.status},
                    maxlen=self.stream_len,
                    approximate=True,
                    nomkstream=True,
                )
        pipe.execute()
