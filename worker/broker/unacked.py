"""The messages taken and not acknowledged yet: kombu's `unacked` hash and index plus our
owner and oversized hashes (`layout.py`), changed only through the Lua scripts (`scripts.py`).

`Unacked` is the one place a taken message is acknowledged, kept visible, handed to another
worker or pushed back; the Redis source and the registry (reaping a dead worker) share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis

from worker.broker import scripts
from worker.broker.layout import BOOKKEEPING, OWNERS, UNACKED, UNACKED_INDEX, queue_key, redis_now


class Unacked:
    """One worker's hand on the unacknowledged messages; `held` is its held set's key (the
    tags it took), which every move keeps true."""

    def __init__(self, client: redis.Redis, queue: str, held: str) -> None:
        self.client, self.queue, self.held = client, queue, held
        self._move = client.register_script(scripts.MOVE)
        self._ack = client.register_script(scripts.ACK)
        self._refresh = client.register_script(scripts.REFRESH)

    def ack(self, tags: Iterable[str]) -> None:
        """Forget acknowledged messages."""
        tags = [t for t in tags if t]
        if tags:
            self._ack(keys=[*BOOKKEEPING, self.held], args=tags)

    def refresh(self, tags: Iterable[str]) -> None:
        """Mark the messages this worker still holds as just taken (Redis TIME)."""
        tags = [t for t in tags if t]
        if tags:
            self._refresh(keys=[UNACKED_INDEX, OWNERS], args=[self.held, *tags])

    def forward(self, tag: str, raw: bytes, target: str) -> bool:
        """Hand a taken message to the back of list `target` (another worker's queue); False
        if it was not ours to hand (then it is left alone)."""
        keys = [*BOOKKEEPING, self.held, target]
        return bool(self._move(keys=keys, args=[tag, raw, "back", "", self.held]))

    def restore_expired(self, visibility_s: float, limit: int = 256) -> int:
        """Push back messages unacknowledged (and not refreshed by a live owner) for longer
        than `visibility_s`, by Redis TIME; how many went back."""
        ceiling = redis_now(self.client) - visibility_s
        tags = self.client.zrangebyscore(UNACKED_INDEX, "-inf", ceiling, start=0, num=limit)
        return sum(self.push_back(tag, cutoff=ceiling) for tag in tags)

    def push_back(self, tag: bytes | str, owner: str = "", cutoff: float | None = None) -> int:
        """Move one unacknowledged message back to the front of its queue (1), unless another
        worker did first, it is gone, it is held by another worker than `owner` (a held
        set's key; "": any) or was refreshed after `cutoff` (0)."""
        entry = self.client.hget(UNACKED, tag)
        where, payload = "front", ""
        try:
            payload, _exchange, key = json.loads(entry)
            if payload is None:  # too large to read: Redis moves it back unread, where it was
                payload = ""
            else:
                payload["headers"]["redelivered"] = True
                payload["properties"]["delivery_info"]["redelivered"] = True
                priority = int(payload["properties"].get("priority") or 0)
                key, payload = queue_key(key or self.queue, priority), json.dumps(payload)
        except (KeyError, TypeError, ValueError):  # vanished, or not ours to read: drop it
            where, key = "drop", self.queue
        keys = [*BOOKKEEPING, self.held, key]
        return self._move(
            keys=keys, args=[tag, payload, where, "" if cutoff is None else cutoff, owner]
        )
