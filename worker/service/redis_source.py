"""The Redis fast path: many messages per round trip, acknowledged many at a time, in the
kombu Redis transport's own layout (the lists Celery producers push to, the `unacked` hash
and `unacked_index` sorted set), so `send_task` producers need nothing new.

Taking a message and recording it as unacknowledged happen in one Lua script: a worker killed
at any moment loses nothing; what it held is pushed back once the visibility timeout passes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from api_client.wire import PRIORITY_STEPS, broker_options
from inferq.settings import Settings
from worker.service.sources import Received, unwrap

SEP = "\x06\x16"  # kombu's separator between a queue name and its priority step
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
RESTORE_EVERY_S = 2.0
IDLE_SLEEP_S = (0.005, 0.25)  # between polls of an empty queue: doubling from, up to

# KEYS: the queue's keys, most urgent first, then the unacked hash and index.
# ARGV: how many to take, now. Returns item, tag pairs (tag "" when the item is no envelope).
_TAKE = """
local limit, now = tonumber(ARGV[1]), ARGV[2]
local hkey, zkey = KEYS[#KEYS - 1], KEYS[#KEYS]
local out = {}
for i = 1, #KEYS - 2 do
  while #out < 2 * limit do
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
      end
    end
    out[#out + 1] = item
    out[#out + 1] = tag
  end
end
return out
"""

# KEYS: unacked hash, index, target list. ARGV: tag, payload. Only one restorer wins a tag.
_RESTORE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('RPUSH', KEYS[3], ARGV[2])
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
    """Take, acknowledge and (after the visibility timeout) restore job messages."""

    handles_outlive_connection = True  # a delivery tag names the message in Redis itself

    def __init__(self, settings: Settings):
        self.client = redis.Redis.from_url(settings.resolved_broker_url)
        self.client.ping()
        self.queue = settings.queue
        self.visibility_s = broker_options(settings)["visibility_timeout"]
        self._keys = [queue_key(self.queue, p) for p in PRIORITY_STEPS] + [UNACKED, UNACKED_INDEX]
        self._take = self.client.register_script(_TAKE)
        self._restore = self.client.register_script(_RESTORE)
        self._next_restore = 0.0
        self._idle_s = IDLE_SLEEP_S[0]

    def receive(self, limit: int, wait_s: float) -> list[Received]:
        deadline = time.monotonic() + wait_s
        while True:
            if time.monotonic() >= self._next_restore:
                self.restore_expired()
            raw = self._take(keys=self._keys, args=[limit, time.time()]) if limit > 0 else []
            if raw:
                self._idle_s = IDLE_SLEEP_S[0]
                return [
                    self._received(item, tag) for item, tag in zip(raw[::2], raw[1::2], strict=True)
                ]
            if time.monotonic() >= deadline:
                return []
            time.sleep(self._idle_s)  # an idle queue is polled ever less often (to 0.25 s)
            self._idle_s = min(2 * self._idle_s, IDLE_SLEEP_S[1])

    @staticmethod
    def _received(item: bytes, tag: bytes) -> Received:
        handle = tag.decode() if tag else None
        try:
            return unwrap(json.loads(item), handle)
        except (KeyError, TypeError, ValueError, AttributeError):  # not a kombu envelope
            return Received(item, None, {}, handle)

    def ack(self, handles: list[Any]) -> None:
        tags = [h for h in handles if h]
        if tags:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(UNACKED_INDEX, *tags).hdel(UNACKED, *tags).execute()

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
        return self._restore(keys=[UNACKED, UNACKED_INDEX, key], args=[tag, json.dumps(payload)])

    def close(self) -> None:
        self.client.close()
