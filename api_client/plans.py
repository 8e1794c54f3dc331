"""Waits, cancels and streams as plans: generators that say which Redis call they need next
(`Read`, `Subscribe`, `Listen`, `XRead`, `Send`) and what to hand the caller (`Emit`), and
get each call's reply back. `InferqClient` runs them with blocking Redis, `AsyncInferqClient`
with asyncio: one logic, two ways of doing the I/O.

A waiter subscribes to its jobs' result channels first, then reads the keys (so no state is
missed in between), then blocks on the notifications; a notification only says which key to
read again (the client's shared subscription reads it), its payload is never trusted. Every
`poll` s it reads all its keys anyway: a lost notification costs that much, not the result.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

from api_client import cancels
from api_client.producer import tenant_view
from api_client.results import CANCEL_CHANNEL, cancel_key, result_key
from api_client.streams import StreamReader
from storage.records import TERMINAL_STATUSES, JobStatus, JobView

# Redis connections one client may hold: waits share one subscription, and an asyncio client's
# stream reads one XREAD, but each stream a blocking client reads blocks one connection (its
# thread's XREAD), so a thread per stream for a thousand streams needs a thousand (redis-py's
# own default is 100).
MAX_CONNECTIONS = 10_000


@dataclass(frozen=True, slots=True)
class Read:
    """MGET: reply, the values."""

    keys: list[str]


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Watch these channels through the client's shared subscription (`api_client.notify`),
    from when Redis has them until the plan ends."""

    channels: list[str]


@dataclass(frozen=True, slots=True)
class Listen:
    """Wait up to `seconds` for notifications; reply, the jobs announced (all that came),
    each with its result key's value read after the announcement."""

    seconds: float


@dataclass(frozen=True, slots=True)
class XRead:
    """XREAD from one stream; reply, its entries ([] after `block_ms` without any)."""

    key: str
    last_id: Any
    count: int
    block_ms: int


@dataclass(frozen=True, slots=True)
class Send:
    """Commands in one pipeline; reply, theirs."""

    commands: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Emit:
    """A value for the caller."""

    value: Any


Op = Read | Subscribe | Listen | XRead | Send | Emit
Plan = Generator[Op, Any, None]


class Waiting:
    """Which of a set of jobs have ended, fed with the values of their result keys."""

    def __init__(self, job_ids: Iterable[uuid.UUID | str], tenant: str) -> None:
        self.ids = list(dict.fromkeys(uuid.UUID(str(j)) for j in job_ids))
        self.tenant = tenant
        self.ended: dict[uuid.UUID, JobView] = {}

    @property
    def pending(self) -> list[uuid.UUID]:
        return [i for i in self.ids if i not in self.ended]

    def update(self, job_id: uuid.UUID, raw: bytes | str | None) -> JobView | None:
        """The job's view if this value says it has ended (then it is no longer pending)."""
        view = tenant_view(raw, job_id, self.tenant)
        if view is None or view.status not in TERMINAL_STATUSES:
            return None
        self.ended[job_id] = view
        return view

    def views(self) -> list[JobView]:
        return [self.ended[i] for i in self.ids]

    def timed_out(self, timeout: float) -> TimeoutError:
        n = len(self.pending)
        return TimeoutError(f"{n} of {len(self.ids)} jobs not finished after {timeout}s")


def ended(waiting: Waiting, timeout: float, poll: float) -> Plan:
    """Emit each job's view as it ends; TimeoutError when some have not after `timeout` s."""
    deadline = time.monotonic() + timeout
    yield Subscribe([result_key(i) for i in waiting.ids])
    heard: dict[uuid.UUID, Any] = {}
    next_read = 0.0
    while True:
        now = time.monotonic()
        if now >= next_read:  # every key: the first time, then every `poll` s
            ids, next_read = waiting.pending, now + poll
            values = yield Read([result_key(i) for i in ids])
            heard = dict(zip(ids, values, strict=True))
        for job_id in [i for i in waiting.pending if i in heard]:
            if (view := waiting.update(job_id, heard[job_id])) is not None:
                yield Emit(view)
        if not waiting.pending:
            return
        if now >= deadline:
            raise waiting.timed_out(timeout)
        heard = yield Listen(max(min(deadline, next_read) - time.monotonic(), 0.001))


def cancel(job_id: uuid.UUID, tenant: str, key: str | None, wait: float, poll: float) -> Plan:
    """Emit whether the job is cancelled or stays a request for a job not ended (see
    `InferqClient.cancel`)."""
    (raw,) = yield Read([result_key(job_id)])
    view = tenant_view(raw, job_id, tenant)
    if (raw is not None and view is None) or (view and view.status in TERMINAL_STATUSES):
        yield Emit(view is not None and view.status == JobStatus.CANCELLED)
        return
    req = cancels.request(job_id, tenant, key).encode()
    yield Send([("SADD", cancel_key(job_id), req), ("PUBLISH", CANCEL_CHANNEL, str(job_id))])
    if view is None:  # queued: the worker that takes it reads the request first
        yield Emit(True)
        return
    try:  # running: a worker drops it at once
        yield from _mapped(ended(Waiting([job_id], tenant), wait, poll), _is_cancelled)
    except TimeoutError:  # recorded: workers re-read requests every cancel_poll_s
        yield Emit(True)


def _is_cancelled(view: JobView) -> bool:
    return view.status == JobStatus.CANCELLED


def _mapped(plan: Plan, fn: Any) -> Plan:
    """`plan`, with `fn(value)` emitted for each value it emits."""
    reply = None
    while True:
        try:
            op = plan.send(reply)
        except StopIteration:
            return
        if isinstance(op, Emit):
            reply = yield Emit(fn(op.value))
        else:
            reply = yield op


def stream(job_id: uuid.UUID, tenant: str, timeout: float, poll: float) -> Plan:
    """Emit the job's text delta by delta (see `api_client.streams`)."""
    reader = StreamReader(job_id, tenant)
    (raw,) = yield Read([reader.result_key])
    reader.result(raw)  # ended already: the result says all
    deadline = time.monotonic() + timeout
    while not reader.finished:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {job_id} still streaming after {timeout}s")
        entries = yield XRead(reader.key, reader.last_id, reader.COUNT, reader.block_ms(poll, left))
        for delta in reader.feed(entries):
            yield Emit(delta)
        if reader.wants_result(bool(entries)):
            (raw,) = yield Read([reader.result_key])
            reader.result(raw)
    for delta in reader.rest():
        yield Emit(delta)
