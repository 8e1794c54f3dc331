"""The Redis fast path: many messages per round trip, acknowledged many at a time, in the
kombu Redis transport's own layout (`layout.py`: the lists Celery producers push to, the
`unacked` hash and `unacked_index` sorted set), so `send_task` producers need nothing new.

Taking a message and recording it as unacknowledged happen in one Lua script (`scripts.py`):
a worker killed at any moment loses nothing; what it held is pushed back once the visibility
timeout passes. A live worker keeps what it holds visible (it refreshes their index scores
every few seconds), so only a dead worker's messages come back. Every time here is Redis
`TIME`, never the host's clock. An item too large for a job message is never parsed nor sent
whole: the worker gets its head, size and SHA-1 and keeps it as a dead letter.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from api_client.wire import PRIORITY_STEPS, broker_options
from inferq.logs import get_logger
from inferq.settings import Settings
from worker.broker import scripts
from worker.broker.affinity import Router
from worker.broker.doorbell import Doorbell
from worker.broker.envelope import MAX_KEPT_BYTES, MAX_RAW_BYTES, unwrap
from worker.broker.layout import (
    BOOKKEEPING,
    affinity_queue,
    aging_key,
    held_key,
    queue_key,
    unrouted_key,
)
from worker.broker.registry import Registry
from worker.broker.source import Received
from worker.broker.unacked import Unacked

log = get_logger("inferq.redis_source")
TICK_S = 1.0  # heartbeat and reaping
VIEW_S = 0.2  # routing reads the peers' loads again when its view is older than this
RESTORE_EVERY_S = 2.0
REFRESH_S = 5.0  # held messages are marked as just taken this often (at most a third of the
# visibility timeout)
IDLE_SLEEP_S = (0.005, 0.25)  # between polls of an empty queue: doubling from, up to
BELL_POLL_S = 1.0  # the cap where the doorbell works instead: a poll only covers a lost ring


class RedisSource:
    """Take, acknowledge and (after the visibility timeout) restore job messages; with
    affinity, also consume this worker's own queue and hand jobs to the workers that own
    their prefixes."""

    handles_outlive_connection = True  # a delivery tag names the message in Redis itself

    def __init__(self, settings: Settings, worker: str = "", models: Iterable[str] = ()):
        self.client = redis.Redis.from_url(settings.resolved_broker_url)
        self.client.ping()
        self.queue = settings.queue
        self.visibility_s = broker_options(settings)["visibility_timeout"]
        self.aging_s = settings.broker_aging_s
        self._take = self.client.register_script(scripts.TAKE)
        self._held = held_key(self.queue, worker)
        self._unrouted = unrouted_key(self.queue, worker)
        self.unacked = Unacked(self.client, self.queue, self._held)
        self._refresh_s = min(REFRESH_S, self.visibility_s / 3)
        self._next_restore = self._next_tick = self._next_refresh = self._looked = 0.0
        self._closed = threading.Event()
        self._idle_s = IDLE_SLEEP_S[0]
        self._next_poll = 0.0  # monotonic: an empty queue is taken from again then (or rung)
        self.registry: Registry | None = None
        self.router = Router(settings.affinity_load_factor)
        own = ""
        if settings.affinity and worker:
            self.registry = Registry(self.unacked, worker, models, settings.affinity_dead_after_s)
            own = affinity_queue(self.queue, worker)
            self.registry.beat()
            threading.Thread(target=self._beat, name="inferq-beat", daemon=True).start()
        lists = [
            [queue_key(own, p), queue_key(self.queue, p)] if own else [queue_key(self.queue, p)]
            for p in PRIORITY_STEPS
        ]
        self._lists = [key for pair in lists for key in pair]  # by urgency: own queue first
        self._own = {key for key in self._lists if own and key.startswith(own)}
        self._keys = [*self._lists, *BOOKKEEPING, aging_key(self.queue), self._held, self._unrouted]
        self._bell = Doorbell(self.client.connection_pool, self._lists)

    def receive(self, limit: int, wait_s: float) -> list[Received]:
        """Up to `limit` messages, waiting up to `wait_s` for the first. An empty queue is
        taken from again when the doorbell rings, else polled ever less often (across calls:
        a call that ends quiet leaves the next poll where it was)."""
        deadline = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            if now >= self._next_restore:
                self.restore_expired()
            if limit > 0 and now >= self._next_poll:
                raw = self._take_raw(limit)
                if raw:
                    self._idle_s = IDLE_SLEEP_S[0]  # more may wait: the next call takes at once
                    return [
                        self._oversized(item, tag, self._lists[int(i) - 1], big)
                        if big
                        else self._received(item, tag, self._lists[int(i) - 1])
                        for item, tag, i, big in zip(*(raw[k::4] for k in range(4)), strict=True)
                    ]
                self._next_poll = now + self._idle_s
                cap = BELL_POLL_S if self._bell.works else IDLE_SLEEP_S[1]
                self._idle_s = min(2 * self._idle_s, cap)
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            until = self._next_poll if limit > 0 else deadline
            if self._bell.wait(min(left, max(0.0, until - time.monotonic()))):
                self._next_poll = 0.0  # rung by a push: take now

    def _take_raw(self, limit: int) -> list[Any]:
        args = [limit, MAX_RAW_BYTES, MAX_KEPT_BYTES, self.aging_s, int(self.registry is not None)]
        return self._take(keys=self._keys, args=args)

    def _oversized(self, head: bytes, tag: bytes, origin: str, size_sha1: bytes) -> Received:
        """An item too large to read, as its head: `read_job` refuses it, unread."""
        size, sha1 = size_sha1.decode().split()
        return Received(
            head,
            None,
            {},
            tag.decode(),
            origin=origin,
            routed=origin in self._own,
            oversized=(int(size), sha1),
        )

    def _received(self, item: bytes, tag: bytes, origin: str) -> Received:
        handle = tag.decode() if tag else None
        try:
            got = unwrap(json.loads(item), handle)
            if not isinstance(got.body, str | bytes):
                raise TypeError("the body is not text")
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
            got = Received(item, None, {}, handle)  # not a kombu envelope (or nested too deep)
        got.raw, got.origin, got.routed = item, origin, origin in self._own
        return got

    def ack(self, handles: list[Any]) -> None:
        self.unacked.ack(handles)

    # -- affinity ----------------------------------------------------------------------------

    def tick(self, holding: Callable[[], list[Any]]) -> None:
        """Every few seconds: keep the messages in hand (`holding()`) visible. About once a
        second: reap dead peers (the heartbeat has a thread of its own, so a worker busy
        retrying its database never looks dead)."""
        if time.monotonic() >= self._next_refresh:
            self._next_refresh = time.monotonic() + self._refresh_s
            self.unacked.refresh(holding())
        if self.registry is None or time.monotonic() < self._next_tick:
            return
        self._next_tick = time.monotonic() + TICK_S
        dead = self._look()
        if dead and self.registry.reap(dead):
            log.info("affinity.reaped", workers=sorted(name for name, _ in dead))

    def _beat(self) -> None:
        assert self.registry is not None
        while not self._closed.wait(TICK_S):
            with contextlib.suppress(redis.RedisError):  # away: beats resume when it is back
                self.registry.beat()

    def _look(self) -> list[tuple[str, float]]:
        """Refresh the router's view of the live peers and their loads; the dead ones."""
        assert self.registry is not None
        live, dead = self.registry.peers()
        self.router.refresh(live)
        self._looked = time.monotonic()
        return dead

    def owner(self, key: Callable[[], bytes | None], model: str) -> str | None:
        """The worker that should run a job with the routing key `key()` gives (None: any,
        e.g. here). The key is only computed when there is a peer to route to."""
        if self.registry is None:
            return None
        if time.monotonic() - self._looked > VIEW_S:  # a burst is routed on fresh loads
            self._look()
        if len(self.router.peers) < 2:
            return None
        routing_key = key()
        if routing_key is None:
            return None
        return self.router.owner(routing_key, model)

    def routed(self) -> None:
        """The last take is routed: what this worker kept of it is its load now."""
        if self.registry is not None:
            self.client.delete(self._unrouted)

    def forward(self, message: Received, worker: str) -> bool:
        """Hand a message taken from the shared queue to `worker`'s queue (at the same
        priority); False if it was not ours to hand (then it is left alone)."""
        assert message.origin is not None and message.handle and message.raw is not None
        target = affinity_queue(self.queue, worker) + message.origin[len(self.queue) :]
        return self.unacked.forward(message.handle, message.raw, target)

    def restore_expired(self, limit: int = 256) -> int:
        """Push back messages unacknowledged (and not refreshed by a live owner) for longer
        than the visibility timeout, by Redis TIME."""
        self._next_restore = time.monotonic() + RESTORE_EVERY_S
        return self.unacked.restore_expired(self.visibility_s, limit)

    def requeue(self, handles: list[Any]) -> None:
        """Push back messages this worker holds but will not finish (a clean stop)."""
        for tag in filter(None, handles):
            self.unacked.push_back(tag)

    def retire(self) -> None:
        """A clean stop: leave the registry and hand back the own queue's waiting messages."""
        if self.registry is not None:
            self.registry.retire()

    def close(self) -> None:
        self._closed.set()
        self._bell.close()
        self.client.close()
