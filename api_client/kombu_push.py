"""A job sent as Celery's producer sends it, without it: the same protocol-2 message (its
headers, properties and base64 JSON body) pushed onto kombu's Redis list for its priority,
with the queue's kombu bindings, in one pipelined round trip (both clients' `submit_many` and
`AsyncInferqClient.send` on a Redis broker: no thread, no Celery producer per message; a batch
is one LPUSH per list, so a worker takes it whole, not the first few of it).

What Celery and kombu write (kombu's Redis transport, the version pinned in pyproject.toml;
tests/service/test_kombu_layout.py checks this module against both, item by item):
- the list `queue` for kombu priority 0, `queue + SEP + step` for the others (kombu's
  `Channel._q_for_pri`); our priority 9 (runs first) is kombu's 0;
- the item: `{"body": base64(JSON [[], kwargs, embed]), "content-encoding": "utf-8",
  "content-type": "application/json", "headers": Celery's task headers, "properties":
  {"correlation_id", "reply_to", "kwargsrepr", "delivery_mode": 2, "delivery_info": {"exchange": "",
  "routing_key": queue}, "priority", "body_encoding": "base64", "delivery_tag"}}`;
- the queue's bindings, as declaring it does: `_kombu.binding.<queue>` and
  `_kombu.binding_permanent.<queue>` hold `queue SEP SEP queue`.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Protocol

from celery.utils.nodenames import anon_nodename

from api_client.schema import JobMessage
from api_client.signing import signed
from api_client.wire import PRIORITY_STEPS, TASK_NAME, celery_priority, kwargs_repr

SEP = "\x06\x16"  # kombu's separator between a queue name and its priority step
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
PUSH_ITEMS = 1000  # items in one LPUSH at most (a bigger batch is several, in order)


class Pipeline(Protocol):
    """What `queue_jobs` needs of a redis-py pipeline (sync or asyncio)."""

    def sadd(self, name: str, *values: str) -> Any: ...
    def lpush(self, name: str, *values: bytes) -> Any: ...


def queue_key(queue: str, priority: int) -> str:
    """The list a message of kombu `priority` (0 runs first) sits in."""
    step = max(s for s in PRIORITY_STEPS if s <= max(0, min(priority, PRIORITY_STEPS[-1])))
    return f"{queue}{SEP}{step}" if step else queue


def bindings(queue: str) -> list[tuple[str, str]]:
    """The (set, member) pairs declaring the queue writes."""
    member = f"{queue}{SEP}{SEP}{queue}"
    return [(f"_kombu.binding.{queue}", member), (f"_kombu.binding_permanent.{queue}", member)]


def celery_message(
    queue: str, message: JobMessage, key: str | None, reply_to: str = ""
) -> tuple[str, bytes]:
    """The list to push onto and the item: the job signed with `key` (when given), its job
    id the Celery task id, as `send_task(TASK_NAME, kwargs=..., queue=queue, priority=...,
    task_id=...)` writes it."""
    kwargs = signed(message.to_wire(), key)
    task_id = str(message.job_id)
    body = json.dumps([[], kwargs, EMBED])
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": kwargs_repr(message),
        "origin": anon_nodename(),
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    priority = celery_priority(message.priority)
    item = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "kwargsrepr": headers["kwargsrepr"],  # Celery copies a given kwargsrepr here too
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return queue_key(queue, priority), json.dumps(item).encode()


def queue_jobs(
    pipe: Pipeline,
    queue: str,
    messages: Iterable[JobMessage],
    key: str | None,
    reply_to: str,
    *,
    declare: bool = True,
) -> None:
    """Queue on `pipe` the pushes of `messages` (signed with `key`) and, with `declare`, the
    queue's bindings: one LPUSH per list (per `PUSH_ITEMS`), in order, so a kombu consumer
    (which pops the other end) takes them first to last."""
    lists: defaultdict[str, list[bytes]] = defaultdict(list)
    for message in messages:
        list_key, item = celery_message(queue, message, key, reply_to)
        lists[list_key].append(item)
    if declare:
        for name, member in bindings(queue):
            pipe.sadd(name, member)
    for list_key, items in lists.items():
        for start in range(0, len(items), PUSH_ITEMS):
            pipe.lpush(list_key, *items[start : start + PUSH_ITEMS])
