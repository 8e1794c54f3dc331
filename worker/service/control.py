"""The cancel listener: cancel requests reach the worker by notification, not by polling.

Two ways in, both treated as hostile input:
- `InferqClient.cancel` adds a request to the job's cancel set (`inferq:cancel:<id>`) and
  PUBLISHes the job id on `inferq:cancel`;
- Celery's `app.control.revoke(id)`: kombu's Redis transport PUBLISHes the broadcast on the
  `celery.pidbox` fanout channel (`/<db>.celery.pidbox`). Only the `revoke` command is read
  (JSON only, its task ids and nothing else); the worker records it in the job's cancel set as
  a request naming no tenant, so it also holds for a job no worker has taken yet.

A request cancels only what `api_client.cancels.allowed` allows, checked against the stored
job's tenant (or, at claim, the message's, which is the stored job's). A notification carries
nothing trusted: the worker reads the job's cancel set itself. Every `cancel_poll_s` it re-reads
the cancel sets of the jobs it holds (a lost notification costs seconds), and the intake asks
`screen` about the jobs it has just claimed (a cancel that came before any worker took the
job). The result sink still checks the database's statuses (a cancel written there) slowly.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace

import redis

from api_client import cancels
from api_client.results import CANCEL_CHANNEL, cancel_key, pidbox_channel
from inferq.logs import get_logger
from inferq.settings import Settings
from storage.records import ACTIVE_STATUSES, JobState, JobStatus
from storage.repository import Repository
from worker.service.arrivals import Arrival, taken
from worker.service.jobs import Ledger
from worker.service.messages import uuid_or_none
from worker.service.priority import as_helper_thread
from worker.service.retry import Backoff

log = get_logger("inferq.control")
MAX_NOTICE_BYTES = 64 << 10  # a larger broadcast is not read
MAX_REVOKED = 100  # task ids read from one revoke


def revoked_ids(data: bytes | str) -> list[uuid.UUID]:
    """The job ids of a Celery `revoke` broadcast as kombu's Redis transport publishes it (a
    JSON envelope, base64 JSON body); [] for anything else. Never raises."""
    if len(data) > MAX_NOTICE_BYTES:
        return []
    try:
        envelope = json.loads(data)
        if envelope.get("content-type") != "application/json":
            return []
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True)
        command = json.loads(body)
        if command.get("method") != "revoke":
            return []
        task_ids = command.get("arguments", {}).get("task_id")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return []
    task_ids = [task_ids] if isinstance(task_ids, str) else task_ids
    if not isinstance(task_ids, list):
        return []
    return [i for i in map(uuid_or_none, task_ids[:MAX_REVOKED]) if i is not None]


class CancelListener:
    """Subscribes on the result Redis (and the broker's, for Celery's pidbox, when it is
    another one); `screen` is for the intake."""

    def __init__(
        self,
        settings: Settings,
        repo: Repository,
        ledger: Ledger,
        client: redis.Redis,
        broker: redis.Redis | None,
        drop: Callable[[list[uuid.UUID]], None],
        published: Callable[[Iterable[uuid.UUID]], None],
    ):
        self.repo, self.ledger, self.client = repo, ledger, client
        self.keys, self.require_signature = settings.signing_keys(), settings.require_signature
        self.poll_s, self.expires_s = settings.cancel_poll_s, int(settings.result_expires_s)
        self._drop, self._published = drop, published
        db = (broker or client).connection_pool.connection_kwargs.get("db", 0)
        pidbox = pidbox_channel(db)  # on the broker (None: the broker is `client`'s Redis)
        channels = [(client, [CANCEL_CHANNEL] if broker else [CANCEL_CHANNEL, pidbox])]
        if broker is not None:
            channels.append((broker, [pidbox]))
        self._stop = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._listen, args=(c, names, n == 0), name=f"inferq-cancels-{n}"
            )
            for n, (c, names) in enumerate(channels)
        ]
        for thread in self.threads:
            thread.daemon = True

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout)

    # -- on the listener threads -----------------------------------------------------------

    def _listen(self, client: redis.Redis, channels: list[str], polls: bool) -> None:
        """Read notifications until stopped, reconnecting with backoff; the first listener
        also re-reads the held jobs' cancel sets every `poll_s`."""
        as_helper_thread()
        backoff, next_poll = Backoff(), 0.0
        while not self._stop.is_set():
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*channels)
                backoff.reset()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=min(self.poll_s, 1.0))
                    if message is not None and message["type"] == "message":
                        self._notice(message["channel"], message["data"])
                    if polls and time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + self.poll_s
                        self.check(self.ledger.ids())
            except Exception as exc:  # Redis away, or a database error: retried
                log.warning("cancels.listen_failed", error=type(exc).__name__)
                backoff.wait(self._stop)
            finally:
                pubsub.close()

    def _notice(self, channel: bytes, data: bytes) -> None:
        if channel.decode(errors="replace") == CANCEL_CHANNEL:
            job_id = uuid_or_none(data.decode(errors="replace")) if len(data) <= 64 else None
            ids = [job_id] if job_id is not None else []
        else:
            ids = revoked_ids(data)
            if ids:  # recorded: it also holds for a job no worker has taken yet
                revoke = [cancels.CancelRequest(i, None).encode() for i in ids]
                pipe = self.client.pipeline(transaction=False)
                for job_id, req in zip(ids, revoke, strict=True):
                    pipe.sadd(cancel_key(job_id), req)
                pipe.execute()
        self.check(ids)

    def check(self, job_ids: list[uuid.UUID]) -> None:
        """Apply the allowed cancel requests of these stored jobs (queued or running, here or
        elsewhere); a job not stored yet is screened when a worker claims it."""
        requests = self._requests(job_ids)
        if not requests:
            return
        views = self.repo.get_many(list(requests))
        for job_id, reqs in requests.items():
            view = views.get(job_id)
            if view is None or view.status not in ACTIVE_STATUSES:
                continue
            if not self._allowed(reqs, view.tenant, job_id):
                continue
            if self.repo.cancel(job_id):
                log.info("job.cancel_requested", job_id=str(job_id))
                self._published([job_id])
            if job_id in self.ledger and self.repo.statuses([job_id]).get(job_id) == "cancelled":
                self._drop([job_id])

    def _requests(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[cancels.CancelRequest]]:
        """The parsed cancel requests of each job that has any (one round trip)."""
        if not job_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:  # a producer may not set expiries: the worker does
            pipe.srandmember(cancel_key(job_id), cancels.MAX_REQUESTS)
            pipe.expire(cancel_key(job_id), self.expires_s)
        replies = pipe.execute()[::2]
        found = {}
        for job_id, members in zip(job_ids, replies, strict=True):
            reqs = [r for r in (cancels.parse(m, job_id) for m in members or ()) if r]
            if reqs:
                found[job_id] = reqs
        return found

    def _allowed(self, reqs: list[cancels.CancelRequest], tenant: str, job_id: uuid.UUID) -> bool:
        if any(cancels.allowed(r, tenant, self.keys, self.require_signature) for r in reqs):
            return True
        log.warning("job.cancel_refused", job_id=str(job_id), requests=len(reqs))
        return False

    # -- on the intake's thread --------------------------------------------------------------

    def screen(
        self, arrivals: list[Arrival], states: dict[uuid.UUID, JobState], worker: str
    ) -> dict[uuid.UUID, JobState]:
        """`states` with the jobs just claimed for `worker` that an allowed request cancels
        marked cancelled (cancelled in the database too): the intake then runs none of them."""
        mine = {
            a.row.id: a.row.tenant
            for a in arrivals
            if (s := states.get(a.row.id)) is not None
            and s.id == a.row.id
            and s.status == JobStatus.RUNNING
            and s.worker == worker
            and not taken(a, s)
        }
        out = dict(states)
        try:
            for job_id, reqs in self._requests(list(mine)).items():
                if self._allowed(reqs, mine[job_id], job_id) and self.repo.cancel(job_id):
                    log.info("job.cancelled_before_running", job_id=str(job_id))
                    out[job_id] = replace(states[job_id], status=JobStatus.CANCELLED, view=None)
        except Exception as exc:  # Redis or the database away: the listener's re-reads catch up
            log.warning("cancels.screen_failed", error=type(exc).__name__)
        return out
