"""What every message source is: `Received` messages handed out, acknowledged or given back.

An unacknowledged message comes back (Redis: once the visibility timeout has passed; kombu:
when the connection closes). The implementations (`kombu_source.py`, `redis_source.py`)
import this module; `factory.py` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Received:
    body: bytes | str
    content_type: str | None
    headers: dict[str, Any]
    handle: Any  # what `ack` needs
    raw: bytes | None = None  # the message as the broker holds it (Redis: to forward it)
    origin: str | None = None  # the list it came from (Redis)
    routed: bool = False  # it came from this worker's own affinity queue
    oversized: tuple[int, str] | None = None  # too large to read (Redis): its size and SHA-1;
    # `body` then holds only the head of the raw item


class Source(Protocol):
    handles_outlive_connection: bool  # can a message taken before a reconnect be acked after?

    def receive(self, limit: int, wait_s: float) -> list[Received]:
        """Up to `limit` messages, waiting up to `wait_s` for the first."""
        ...

    def ack(self, handles: list[Any]) -> None: ...

    def requeue(self, handles: list[Any]) -> None:
        """Give messages back to the queue now (they were not finished here)."""
        ...

    def tick(self, holding: Callable[[], list[Any]]) -> None:
        """Periodic upkeep, called between receives: `holding()` gives the handles of the
        messages taken and not acknowledged yet (Redis: kept visible); affinity: reaping dead
        peers."""
        ...

    def owner(self, key: Callable[[], bytes | None], model: str) -> str | None:
        """The worker that should run a job with the prefix key `key()` gives (None: whoever
        took it); `key` is called only when the job may be routed."""
        ...

    def forward(self, message: Received, worker: str) -> bool:
        """Hand a taken message to `worker`'s own queue; True when done."""
        ...

    def routed(self) -> None:
        """The last take is routed (affinity: what was kept of it now counts as load)."""
        ...

    def retire(self) -> None:
        """A clean stop: stop being routed to; give back what waits for this worker."""
        ...

    def close(self) -> None: ...
