"""Where job messages come from: `open_source(settings)` picks the Redis fast path for a
`redis://` broker and kombu for any other (the embedded SQLite-file broker, `memory://`).

A source hands out `Received` messages and acknowledges them; an unacknowledged message comes
back (Redis: once the visibility timeout has passed; kombu: when the connection closes).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kombu import Connection, Consumer

from api_client.wire import broker_options, job_queue
from inferq.settings import Settings


@dataclass(slots=True)
class Received:
    body: bytes | str
    content_type: str | None
    headers: dict[str, Any]
    handle: Any  # what `ack` needs
    raw: bytes | None = None  # the message as the broker holds it (Redis: to forward it)
    origin: str | None = None  # the list it came from (Redis)
    routed: bool = False  # it came from this worker's own affinity queue


class Source(Protocol):
    handles_outlive_connection: bool  # can a message taken before a reconnect be acked after?

    def receive(self, limit: int, wait_s: float) -> list[Received]:
        """Up to `limit` messages, waiting up to `wait_s` for the first."""
        ...

    def ack(self, handles: list[Any]) -> None: ...

    def requeue(self, handles: list[Any]) -> None:
        """Give messages back to the queue now (they were not finished here)."""
        ...

    def tick(self) -> None:
        """Periodic upkeep, called between receives (affinity: reaping dead peers)."""
        ...

    def owner(self, key: Callable[[], bytes | None], model: str) -> str | None:
        """The worker that should run a job with the prefix key `key()` gives (None: whoever
        took it); `key` is called only when the job may be routed."""
        ...

    def forward(self, message: Received, worker: str) -> bool:
        """Hand a taken message to `worker`'s own queue; True when done."""
        ...

    def retire(self) -> None:
        """A clean stop: stop being routed to; give back what waits for this worker."""
        ...

    def close(self) -> None: ...


def open_source(settings: Settings, worker: str = "", models: list[str] | None = None) -> Source:
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        from worker.service.redis_source import RedisSource

        return RedisSource(settings, worker, models or [])
    return KombuSource(settings)


def unwrap(envelope: dict[str, Any], handle: Any) -> Received:
    """A kombu envelope (as kept in Redis lists) as a `Received`; KeyError/TypeError/ValueError
    when it is not one."""
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body, validate=True)
    headers = envelope.get("headers") or {}
    return Received(body, envelope.get("content-type"), headers, handle)


class KombuSource:
    """Any kombu transport, one message at a time."""

    handles_outlive_connection = False  # kombu gives a closed channel's messages back itself

    GATHER_S = 0.002

    def __init__(self, settings: Settings):
        options = broker_options(settings)
        self.conn = Connection(settings.resolved_broker_url, transport_options=options)
        self.conn.ensure_connection(max_retries=1)
        self._got: list[Received] = []
        self.consumer = Consumer(
            self.conn.channel(),
            queues=[job_queue(settings)],
            on_message=lambda m: self._got.append(
                Received(m.body, m.content_type, m.headers or {}, m)
            ),
            accept=["json"],
            no_ack=False,
        )
        self.consumer.consume()

    def receive(self, limit: int, wait_s: float) -> list[Received]:
        timeout = wait_s
        while len(self._got) < limit:
            try:
                self.conn.drain_events(timeout=timeout)
            except TimeoutError:
                break
            timeout = self.GATHER_S
        got, self._got = self._got, []
        return got

    def ack(self, handles: list[Any]) -> None:
        for message in handles:
            message.ack()

    def requeue(self, handles: list[Any]) -> None:
        for message in handles:
            message.requeue()

    def tick(self) -> None:
        pass  # no affinity: every worker takes from the one queue

    def owner(self, key: Callable[[], bytes | None], model: str) -> str | None:
        return None

    def forward(self, message: Received, worker: str) -> bool:
        return False

    def retire(self) -> None:
        pass

    def close(self) -> None:
        self.conn.release()
