"""The streamer: appends each engine step's text deltas to the jobs' Redis Streams
(`inferq:stream:<job id>`, read by `api_client.streams`), on a thread of its own, so the
engine loop does no I/O: it hands over one list per step (`put`), and each Redis round trip
carries every list waiting by then, each job's consecutive pieces joined into one entry
(`coalesce`: when a round trip carries several steps, one entry instead of one per step saves
Redis and every reader the difference).

After a write of n entries the streamer waits n / `stream_entries_per_s` before the next one,
so streaming costs Redis and the readers about that many entries a second whatever the load:
while few jobs stream, every engine step's text goes at once (1 job: 8 ms); with 64 jobs a
write comes about every half second, each job's text of the steps since joined into one entry.

Per delta: XADD `{o: characters before it, d: text}` (and `end`: the finish reason on the
last one), trimmed to `max_new_tokens + 16` entries (a job adds at most one per token, so a
job's own entries are never trimmed: a late reader gets the whole text). A job's first delta
(`o` = 0: a new run, here or after a takeover) replaces what its stream held. A stream expires
`stream_expires_s` after its last delta: EXPIRE goes with a job's first and last delta and,
between them, with the first delta after a tenth of that time (not with every delta: an
EXPIRE per entry was half the commands). Streams are best effort: a delta lost while
Redis is away is not retried, and its readers take the rest of the text from the result.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import redis

from api_client.results import stream_key
from inferq.logs import get_logger
from inferq.settings import Settings
from worker.engine.api import SeqId, TextDelta
from worker.service.metrics import Metrics
from worker.service.priority import as_helper_thread

log = get_logger("inferq.streamer")
IDLE_WAIT_S = 0.5
MAX_BACKLOG = 4096  # step lists waiting: beyond it (Redis stalled) the oldest are dropped
MAX_TRACKED = 4096  # jobs whose expiry time is kept (beyond: those due a refresh are dropped)
REFRESH_SHARE = 0.1  # a running job's expiry is set again after this share of it has passed


class Streamer:
    def __init__(self, settings: Settings, client: redis.Redis, metrics: Metrics):
        self.client, self.metrics = client, metrics
        self.maxlen = settings.max_new_tokens + 16
        self.expires_s = int(settings.stream_expires_s)
        self.entries_per_s = settings.stream_entries_per_s
        self._expiry_sent: dict[SeqId, float] = {}  # running jobs: when EXPIRE was last sent
        self._inbox: queue.Queue[list[TextDelta]] = queue.Queue(MAX_BACKLOG)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="inferq-streamer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.thread.join(timeout)

    def put(self, deltas: list[TextDelta]) -> None:
        """From the engine loop: never blocks (a full backlog drops its oldest step)."""
        while True:
            try:
                self._inbox.put_nowait(deltas)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._inbox.get_nowait()

    def _run(self) -> None:
        as_helper_thread()
        while not (self._stop.is_set() and self._inbox.empty()):
            try:
                batch = self._inbox.get(timeout=IDLE_WAIT_S)
            except queue.Empty:
                continue
            while True:
                try:
                    batch = batch + self._inbox.get_nowait()
                except queue.Empty:
                    break
            entries = coalesce(batch)
            try:
                self.write(entries)
            except Exception as exc:  # readers take the rest from the result
                self.metrics.retries.labels("streamer").inc()
                log.warning("streamer.write_failed", deltas=len(batch), error=type(exc).__name__)
            self._stop.wait(len(entries) / self.entries_per_s)  # what comes meanwhile joins

    def write(self, deltas: list[TextDelta]) -> None:
        """One round trip for every delta."""
        now = time.monotonic()
        refresh_after = now - self.expires_s * REFRESH_SHARE
        pipe = self.client.pipeline(transaction=False)
        for d in deltas:
            key = stream_key(d.seq_id)
            if d.start == 0:
                pipe.delete(key)
            fields = (
                {"o": d.start, "d": d.text}
                if d.end is None
                else {"o": d.start, "d": d.text, "end": d.end}
            )
            pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
            if d.end is not None:
                self._expiry_sent.pop(d.seq_id, None)
                pipe.expire(key, self.expires_s)
            elif d.start == 0 or _due(self._expiry_sent.get(d.seq_id), refresh_after):
                self._expiry_sent[d.seq_id] = now
                pipe.expire(key, self.expires_s)
        pipe.execute()
        if len(self._expiry_sent) > MAX_TRACKED:  # jobs that ended without a last delta here
            self._expiry_sent = {j: t for j, t in self._expiry_sent.items() if t > refresh_after}


def _due(sent_at: float | None, refresh_after: float) -> bool:
    """Whether a job's EXPIRE is to be sent again: never sent by this streamer (a restart, a
    takeover), or sent before `refresh_after` (monotonic seconds, negative soon after boot)."""
    return sent_at is None or sent_at <= refresh_after


def coalesce(deltas: list[TextDelta]) -> list[TextDelta]:
    """Each job's pieces in order, a piece that continues the one before (its `start` is where
    that one ended, and that one did not end the job) joined to it; a piece that starts a new
    run (`start` 0) stays apart, so its stream is still cleared first."""
    runs: dict[SeqId, list[TextDelta]] = {}
    for d in deltas:
        pieces = runs.setdefault(d.seq_id, [])
        last = pieces[-1] if pieces else None
        if last is not None and last.end is None and 0 < d.start == last.start + len(last.text):
            pieces[-1] = TextDelta(d.seq_id, last.start, last.text + d.text, d.end)
        else:
            pieces.append(d)
    return [d for pieces in runs.values() for d in pieces]
