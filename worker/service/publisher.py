"""The result publisher: writes jobs' states to Redis in Celery's result-backend format
(`api_client.results`), so Celery's `AsyncResult`, `InferqClient` and `AsyncInferqClient` get
them without the database.

`publish_views(views)` from the thread that has just committed them: the intake once it has
claimed jobs, the result sink after each commit; both hand over the jobs as their own
transaction left them (`JobState.view`, `store_outcomes(views=...)`), so nothing is read
again. `publish(job_ids)` (the sweeper, the cancel listener, the sink's slow cancel check)
has the publisher read those jobs from the database first. Either way only a committed
record is written (a result that raced a cancel is not the outcome: the job stays
cancelled), under its own id. Its own thread writes each batch in one Redis round trip, one
script call per job (`WRITE_STATE`): the state SET with its expiry and PUBLISHed on the key's
own channel, as Celery's `RedisBackend` does; STARTED never over an ended state and nothing
over SUCCESS (a state from an older commit that comes late changes nothing: `done` is the
only end that follows another, `failed`). Queued jobs get no key (Celery's PENDING). While
the database or Redis is away it retries with backoff.

The thread runs at the normal priority, unlike the other helpers (`priority.py`): it does
little (no database reads on the hot path), and every waiter of a committed result waits on
it. The sink hands its views over with `wait=True`: it sleeps until the thread has tried to
write them (at most `HANDOFF_WAIT_S`), so the two threads do not take the GIL from each other
in the middle of a write (with Python's 5 ms switch interval each such handoff cost up to
5 ms: commit to publish of 100 results took 11-16 ms, most of it waiting for the GIL).
"""

from __future__ import annotations

import itertools
import queue
import threading
import uuid
from collections.abc import Iterable

import redis

from api_client.results import STARTED, SUCCESS, encode, result_key, stream_key, to_meta
from inferq.logs import get_logger
from inferq.settings import Settings
from storage.records import JobState, JobStatus, JobView
from storage.repository import Repository
from worker.service.arrivals import Arrival, taken
from worker.service.metrics import Metrics
from worker.service.retry import Backoff

log = get_logger("inferq.results")
MAX_PER_WRITE = 128  # jobs per write: the first ones of a large batch are out sooner
IDLE_WAIT_S = 0.5
HANDOFF_WAIT_S = 1.0  # the longest a `publish_views(wait=True)` caller waits for the write
#: Jobs to write: each with its committed view, or None (read it from the database).
Jobs = dict[uuid.UUID, JobView | None]
# KEYS: the result key, the stream key. ARGV: the meta, its expiry (ms), its Celery state,
# the stream's end entry ('': none), the stream's length cap. Our metas begin with their
# status (`api_client.results.to_meta`); anything else is decoded.
WRITE_STATE = """
local current = redis.call('GET', KEYS[1])
if current then
  local was = string.match(current, '^{"status":"(%u+)"')
  if not was then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' then was = meta.status end
  end
  if (was == 'SUCCESS' and ARGV[3] ~= 'SUCCESS')
      or (ARGV[3] == 'STARTED' and (was == 'FAILURE' or was == 'REVOKED')) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[2], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[5], '*', 'end', ARGV[4])
end
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
        self._write_state = client.register_script(WRITE_STATE)
        self._inbox: queue.SimpleQueue[tuple[Jobs, threading.Event | None]] = queue.SimpleQueue()
        self._handed: list[threading.Event] = []  # callers waiting for the next write
        self._stop = threading.Event()
        self._abandon = threading.Event()
        self.thread = threading.Thread(target=self._run, name="inferq-results", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is pending (retrying until `timeout`), then stop."""
        self._stop.set()
        self._inbox.put(({}, None))  # wakes the thread
        self.thread.join(timeout)
        self._abandon.set()

    def publish(self, job_ids: Iterable[uuid.UUID]) -> None:
        """Write these jobs' states as the database has them when they are written."""
        jobs: Jobs = dict.fromkeys(job_ids)
        if jobs:
            self._inbox.put((jobs, None))

    def publish_views(self, views: Iterable[JobView], wait: bool = False) -> None:
        """Write these committed views (the caller's transaction has committed them); `wait`:
        return once the thread has tried (or after `HANDOFF_WAIT_S`)."""
        jobs: Jobs = {view.id: view for view in views}
        if not jobs:
            return
        handed = threading.Event() if wait else None
        self._inbox.put((jobs, handed))
        if handed is not None:
            handed.wait(HANDOFF_WAIT_S)

    def _run(self) -> None:
        pending: Jobs = {}  # in order, once each; the latest word on a job wins
        backoff = Backoff()
        while True:
            self._take(pending, wait=not pending)
            if not pending:
                if self._stop.is_set() and self._inbox.empty():
                    self._release()
                    return
                continue
            batch = dict(itertools.islice(pending.items(), MAX_PER_WRITE))
            try:
                self.write(batch)
            except Exception as exc:
                self.metrics.retries.labels("results").inc()
                log.warning("results.write_failed", jobs=len(batch), error=type(exc).__name__)
                self._release()  # nobody waits through an outage: the retries go on here
                if backoff.wait(self._abandon):
                    self._release()
                    return
                continue
            backoff.reset()
            for job_id in batch:
                del pending[job_id]
            if not pending:
                self._release()

    def _release(self) -> None:
        for handed in self._handed:
            handed.set()
        self._handed.clear()

    def _take(self, pending: Jobs, wait: bool) -> None:
        try:
            got = self._inbox.get(timeout=IDLE_WAIT_S) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        jobs, handed = got
        while True:
            pending.update(jobs)
            if handed is not None:
                self._handed.append(handed)
            try:
                jobs, handed = self._inbox.get_nowait()
            except queue.Empty:
                return

    def write(self, jobs: Jobs) -> None:
        """Write the jobs' states (those without a view read from the database first), in
        one Redis round trip."""
        missing = [job_id for job_id, view in jobs.items() if view is None]
        read = self.repo.get_many(missing) if missing else {}
        pipe = self.client.pipeline(transaction=False)
        for job_id, given in jobs.items():
            view = given or read.get(job_id)
            meta = None if view is None else to_meta(view)
            if view is None or meta is None:
                continue
            state = meta["status"]
            end = "" if state in (STARTED, SUCCESS) else view.status
            keys = [result_key(view.id), stream_key(view.id)]
            args = [encode(meta), self.expires_ms, state, end, self.stream_len]
            self._write_state(keys=keys, args=args, client=pipe)
        pipe.execute()
