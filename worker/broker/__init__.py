"""The broker: where job messages come from and go back to. The rest of the worker imports
only this package's surface (below), never its modules.

- `open_source(settings)` (`factory.py`) opens a `Source` (`source.py`: the protocol and the
  `Received` message): the Redis fast path (`redis_source.py`) for a `redis://` broker, kombu
  (`kombu_source.py`) for any other.
- The Redis fast path keeps kombu's Redis layout (`layout.py`: the lists, the `unacked` hash
  and index, our keys beside them; the kombu versions it is tested on, `SUPPORTED_KOMBU`) and
  changes it only through Lua scripts (`scripts.py`), each atomic.
- `Doorbell` (`doorbell.py`) wakes the fast path's wait on an empty queue when anything is
  pushed to its lists (Redis client tracking), so an idle worker takes a job at once.
- `Unacked` (`unacked.py`) is the one place a taken message is acknowledged, kept visible,
  handed to another worker or pushed back.
- Prefix affinity: `Router` and `prefix_key` (`affinity.py`: pure logic) pick a job's worker;
  the `Registry` (`registry.py`) keeps the live workers in Redis and reaps dead ones.
- `envelope.py` reads a message's envelope, its size limits, and a message as a dead letter
  keeps it (`dead_letter_payload`, `sender`).

The seam between the source and the registry: both hold the same `Unacked` (the source's
hand on the messages it took); the registry reaps a dead worker's held messages through it
and reads the queue layout from `layout.py`, so it takes no callbacks into the source.

The imports run one way (tests/unit/test_import_contracts.py forbids cycles): `source`,
`layout`, `scripts`, `affinity` and `doorbell` import nothing of this package; `envelope` and
`kombu_source` build on `source`; `unacked` on `layout` and `scripts`; `registry` on those and
`affinity`; `redis_source` on all of them; `factory` picks `redis_source` or `kombu_source`;
this module only re-exports. No torch, engine or storage here. Enqueueing is not here either:
the client and the sweeper both send through `api_client.wire.send_job` (signed).
"""

from __future__ import annotations

from worker.broker.affinity import Peer, Router, prefix_key
from worker.broker.envelope import (
    MAX_KEPT_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_RAW_BYTES,
    dead_letter_payload,
    raw_body,
    sender,
)
from worker.broker.factory import open_source
from worker.broker.kombu_source import KombuSource
from worker.broker.layout import SUPPORTED_KOMBU, queue_depth, queue_key
from worker.broker.redis_source import RedisSource
from worker.broker.registry import Registry
from worker.broker.source import Received, Source
from worker.broker.unacked import Unacked

__all__ = [
    "MAX_KEPT_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_RAW_BYTES",
    "SUPPORTED_KOMBU",
    "KombuSource",
    "Peer",
    "Received",
    "RedisSource",
    "Registry",
    "Router",
    "Source",
    "Unacked",
    "dead_letter_payload",
    "open_source",
    "prefix_key",
    "queue_depth",
    "queue_key",
    "raw_body",
    "sender",
]
