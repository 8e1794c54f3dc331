"""The Redis fast path: many messages per round trip, acknowledged many at a time, in the
kombu Redis transport's own layout (the lists Celery producers push to, the `unacked` hash
and `unacked_index` sorted set), so `send_task` producers need nothing new.

Taking a message and recording it as unacknowledged happen in one Lua script: a worker killed
at any moment loses nothing; what it held is pushed back once the visibility timeout passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from api_client.wire import PRIORITY_STEPS, broker_options
from inferq.logs import get_logger
from inferq.settings import Settings
from worker.service.affinity import Router
from worker.service.registry import Registry, affinity_queue, held_key
from worker.service.sources import Received, unwrap

log = get_logger("inferq.redis_source")
TICK_S = 1.0  # heartbeat and reaping
VIEW_S = 0.2  # routing reads the peers' loads again when its view is older than this
SEP = "\x06\x16"  # kombu's separator between a queue name and its priority step
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
RESTORE_EVERY_S = 2.0
IDLE_SLEEP_S = (0.005, 0.25)  # between polls of an empty queue: doubling from, up to

# KEYS: the queue's keys, most urgent first, then the unacked hash and index and the set of
# tags this worker holds. ARGV: how many to take, now. Returns item, tag, key index triples
# (tag "" when the item is no envelope).
_TAKE = """
local limit, now = tonumber(ARGV[1]), ARGV[2]
local hkey, zkey, held = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
local out = {}
for i = 1, #KEYS - 3 do
  while #out < 3 * limit do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local tag = ''
    local ok, msg = pcall(cjson.decode, item)
    if ok and type(msg) == 'table' and type(msg.properties) == 'table' then
      local p = msg.properties
      if type(p.delivery_tag) == 'string' and type(p.delivery_info) == 'table' then
        tag = p.delivery_tag
        local entry = '[' .. item .. ',' .. cjson.encode(p.delivery_info.exchange or '') ..
          ',' .. cjson.encode(p.delivery_info.routing_key or '') .. ']'
        redis.call('HSET', hkey, tag, entry)
        redis.call('ZADD', zkey, now, tag)
        redis.call('SADD', held, tag)
      end
    end
    out[#out + 1] = item
    out[#out + 1] = tag
    out[#out + 1] = i
  end
end
return out
"""

# KEYS: unacked hash, index, this worker's held set, target list. ARGV: tag, payload, and
# "front" (a message going back: taken next) or "back" (handed to another worker's queue).
# Moves an unacknowledged message in one step: never lost, never in two places, and only one
# mover wins a tag.
_MOVE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[1])
  if ARGV[3] == 'front' then
    redis.call('RPUSH', KEYS[4], ARGV[2])
  else
    redis.call('LPUSH', KEYS[4], ARGV[2])
  end
  return 1
end
return 0
"""


def queue_key(queue: str, priority: int) -> str:
    """The list a message of kombu `priority` (0 runs first) sits in."""
    step = max(s for s in PRIORITY_STEPS if s <= max(0, min(priority, PRIORITY_STEPS[-1])))
    return f"{queue}{SEP}{step}" if step else queue


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting on `queue`, over its priority lists."""
    pipe = client.pipeline(transaction=False)
    for priority in PRIORITY_STEPS:
        pipe.llen(queue_key(queue, priority))
    return sum(pipe.execute())


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
        self._take = self.client.register_script(_TAKE)
        self._move = self.client.register_script(_MOVE)
        self._next_restore = self._next_tick = self._looked = 0.0
        self._in_hand = 0  # messages of the last take not routed yet
        self._closed = threading.Event()
        self._idle_s = IDLE_SLEEP_S[0]
        self.registry: Registry | None = None
        self.router = Router(settings.affinity_load_factor)
        own = ""
        if settings.affinity and worker:
            self.registry = Registry(
                self.client, self.queue, worker, models, settings.affinity_dead_after_s,
                queue_key, self._push_back,
            )  # fmt: skip
            own = affinity_queue(self.queue, worker)
            self.registry.beat()
            threading.Thread(target=self._beat, name="inferq-beat", daemon=True).start()
        self._held = held_key(self.queue, worker)
        lists = [[queue_key(own, p), queue_key(self.queue, p)] if own else
                 [queue_key(self.queue, p)] for p in PRIORITY_STEPS]  # fmt: skip
        self._lists = [key for pair in lists for key in pair]  # by urgency: own queue first
        self._own = {key for key in self._lists if own and key.startswith(own)}
        self._keys = [*self._lists, UNACKED, UNACKED_INDEX, self._held]

    def receive(self, limit: int, wait_s: float) -> list[Received]:
        deadline = time.monotonic() + wait_s
        while True:
            if time.monotonic() >= self._next_restore:
                self.restore_expired()
            raw = self._take(keys=self._keys, args=[limit, time.time()]) if limit > 0 else []
            if raw:
                self._idle_s = IDLE_SLEEP_S[0]
                self._in_hand = len(raw) // 3
                return [
                    self._received(item, tag, self._lists[int(i) - 1])
                    for item, tag, i in zip(raw[::3], raw[1::3], raw[2::3], strict=True)
                ]
            if time.monotonic() >= deadline:
                return []
            time.sleep(self._idle_s)  # an idle queue is polled ever less often (to 0.25 s)
            self._idle_s = min(2 * self._idle_s, IDLE_SLEEP_S[1])

    def _received(self, item: bytes, tag: bytes, origin: str) -> Received:
        handle = tag.decode() if tag else None
        try:
            got = unwrap(json.loads(item), handle)
        except (KeyError, TypeError, ValueError, AttributeError):  # not a kombu envelope
            got = Received(item, None, {}, handle)
        got.raw, got.origin, got.routed = item, origin, origin in self._own
        return got

    def ack(self, handles: list[Any]) -> None:
        tags = [h for h in handles if h]
        if tags:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(UNACKED_INDEX, *tags).hdel(UNACKED, *tags).srem(self._held, *tags)
            pipe.execute()

    # -- affinity ----------------------------------------------------------------------------

    def tick(self) -> None:
        """About once a second: reap dead peers (the heartbeat has a thread of its own, so a
        worker busy retrying its database never looks dead)."""
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
        me = live.get(self.registry.me)
        if me is not None:  # what this worker took and has not routed yet is not its load
            live[me.name] = dataclasses.replace(me, load=max(0, me.load - self._in_hand))
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
        self._in_hand = max(0, self._in_hand - 1)
        return self.router.owner(routing_key, model)

    def forward(self, message: Received, worker: str) -> bool:
        """Hand a message taken from the shared queue to `worker`'s queue (at the same
        priority); False if it was not ours to hand (then it is left alone)."""
        assert message.origin is not None and message.handle
        target = affinity_queue(self.queue, worker) + message.origin[len(self.queue) :]
        keys = [UNACKED, UNACKED_INDEX, self._held, target]
        return bool(self._move(keys=keys, args=[message.handle, message.raw, "back"]))

    def restore_expired(self, limit: int = 256) -> int:
        """Push back messages unacknowledged for longer than the visibility timeout."""
        self._next_restore = time.monotonic() + RESTORE_EVERY_S
        ceiling = time.time() - self.visibility_s
        tags = self.client.zrangebyscore(UNACKED_INDEX, "-inf", ceiling, start=0, num=limit)
        return sum(self._push_back(tag) for tag in tags)

    def requeue(self, handles: list[Any]) -> None:
        """Push back messages this worker holds but will not finish (a clean stop)."""
        for tag in filter(None, handles):
            self._push_back(tag)

    def _push_back(self, tag: bytes | str) -> int:
        """Move one unacknowledged message back to the front of its queue (1), unless another
        worker did first or it is gone (0)."""
        entry = self.client.hget(UNACKED, tag)
        try:
            payload, _exchange, routing_key = json.loads(entry)
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
            priority = int(payload["properties"].get("priority") or 0)
            key = queue_key(routing_key or self.queue, priority)
        except (KeyError, TypeError, ValueError):  # vanished, or not ours to read: drop it
            self.client.pipeline().zrem(UNACKED_INDEX, tag).hdel(UNACKED, tag).execute()
            return 0
        keys = [UNACKED, UNACKED_INDEX, self._held, key]
        return self._move(keys=keys, args=[tag, json.dumps(payload), "front"])

    def retire(self) -> None:
        """A clean stop: leave the registry and hand back the own queue's waiting messages."""
        if self.registry is not None:
            self.registry.retire()

    def close(self) -> None:
        self._closed.set()
        self.client.close()
