"""Where job messages sit in Redis: kombu's Redis transport layout (what Celery producers
write and kombu consumers read), our keys beside it, and the one clock every worker uses.

kombu's layout, as the Lua scripts (`scripts.py`) read and write it:
- a queue is one list per priority step: `queue` for step 0, `queue + SEP + step` for the
  others (kombu's `Channel._q_for_pri`); producers `LPUSH`, consumers `RPOP`;
- an item is kombu's JSON envelope: `body` (base64 when `properties.body_encoding` says so),
  `content-type`, `headers`, `properties` (`delivery_tag`, `delivery_info.exchange` and
  `.routing_key`, `priority`);
- a message taken and not acknowledged is in the `unacked` hash (tag -> JSON `[envelope,
  exchange, routing key]`) and the `unacked_index` sorted set (tag -> when it was taken); one
  restored gets `headers.redelivered` and `properties.delivery_info.redelivered` set and goes
  back to the consumer's end of its list.

These are kombu's internals, not its API: kombu is pinned (pyproject.toml) to one of
`SUPPORTED_KOMBU`, and tests/service/test_kombu_layout.py checks each version against kombu
itself (its constants, and round trips between kombu and our scripts).
"""

from __future__ import annotations

import redis

from api_client.kombu_push import SEP as SEP  # the layout's, beside the producers' push
from api_client.kombu_push import queue_key as queue_key
from api_client.wire import PRIORITY_STEPS

SUPPORTED_KOMBU = ("5.7.0",)  # the kombu versions whose Redis layout the scripts are tested on
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
OWNERS = "inferq:unacked_owner"  # tag -> the held set of the worker that took it
OVERSIZED = "inferq:unacked_oversized"  # tag -> the list an item too large to read came from
OVERSIZED_ITEMS = "inferq:unacked_oversized_items"  # tag -> that item, kept for its way back
BOOKKEEPING = [UNACKED, UNACKED_INDEX, OWNERS, OVERSIZED, OVERSIZED_ITEMS]


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting on `queue`, over its priority lists."""
    pipe = client.pipeline(transaction=False)
    for priority in PRIORITY_STEPS:
        pipe.llen(queue_key(queue, priority))
    return sum(pipe.execute())


def affinity_queue(queue: str, worker: str) -> str:
    """The queue only `worker` consumes (beside the shared one)."""
    return f"{queue}.w.{worker}"


def held_key(queue: str, worker: str) -> str:
    """The set of delivery tags `worker` has taken and not acknowledged."""
    return f"inferq:held:{queue}:{worker}"


def unrouted_key(queue: str, worker: str) -> str:
    """The set of tags of `worker`'s last take while it routes them (its peers do not count
    those as its load: most may be handed on); emptied when the take is routed."""
    return f"inferq:unrouted:{queue}:{worker}"


def aging_key(queue: str) -> str:
    """The hash of `queue`'s lists that wait (list key -> since when, Redis time)."""
    return f"inferq:aging:{queue}"


def redis_now(client: redis.Redis) -> float:
    """Redis `TIME` in seconds: the clock every worker shares."""
    seconds, micros = client.time()
    return seconds + micros / 1e6
