"""One XREAD for every stream an `AsyncInferqClient` reads at once: `AsyncStreamReads.read`
is what a single stream's `XREAD COUNT n BLOCK ms STREAMS key id` would answer (the entries
after `id`, or [] once `ms` passed without any), but the reads of all the client's streams
are answered by one task with one XREAD over all their keys on one connection, so a gateway or
an app reading a thousand streams holds one connection and makes one round trip per burst of
entries instead of one per stream (a blocking `InferqClient` reads each stream itself).

A read for a stream the XREAD in flight does not cover (a new key, or an earlier id) unblocks
it (`CLIENT UNBLOCK` from the client's other connections), once per XREAD, and the next XREAD
covers it. Several readers of one stream share its key, read from the earliest id among them,
each handed the entries after its own. A failed XREAD fails the reads it carried, as their own
XREADs would have failed; the next read connects afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

NAME = "inferq-streams"  # the shared connection's name (CLIENT LIST)
IDLE_S = 1.0  # with no read waiting, the task looks at `aclose` this often
# Reads end quiet ([]) on this grid, so that reads begun at different times end together: one
# XREAD returns for all of them, not one for each (a read may block up to this much longer)
GRID_S = 0.25
StreamId = tuple[int, int]
Entries = list[tuple[Any, dict[Any, Any]]]


def stream_id(value: bytes | str) -> StreamId:
    """A stream entry id (`ms-seq`, or `ms`) as a pair that orders as Redis does."""
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class _Read:
    key: bytes
    after: StreamId
    count: int
    deadline: float
    future: asyncio.Future[Entries] = field(repr=False)


class AsyncStreamReads:
    """The stream reads of one asyncio client, on the event loop of the first read (a read
    from another loop starts afresh there). `control`: the client's Redis, which sends the
    `CLIENT UNBLOCK`s."""

    def __init__(self, url: str, control: aioredis.Redis) -> None:
        self._url, self._control = url, control
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._redis = aioredis.Redis.from_url(
            self._url, client_name=NAME, single_connection_client=True, health_check_interval=0
        )
        self._reads: list[_Read] = []
        self._waiting = asyncio.Event()  # a read was added
        self._in_flight: dict[bytes, StreamId] | None = None  # the XREAD now blocked: key -> id
        self._client_id: int | None = None  # of the connection the XREAD blocks
        self._unblocked = False  # this XREAD was asked to return already
        self._closing = False
        self._task = self._loop.create_task(self._run(), name=NAME)

    async def read(self, key: str, last_id: bytes | str, count: int, block_ms: int) -> Entries:
        """The entries of `key` after `last_id` (at most `count`), or [] after `block_ms`."""
        if self._loop is not asyncio.get_running_loop() or self._task is None or self._task.done():
            self._start()
        deadline = math.ceil((time.monotonic() + block_ms / 1000) / GRID_S) * GRID_S
        future = asyncio.get_running_loop().create_future()
        read = _Read(key.encode(), stream_id(last_id), count, deadline, future)
        self._reads.append(read)
        self._waiting.set()
        flight = self._in_flight
        if flight is not None and not _covers(flight, read) and not self._unblocked:
            self._unblocked = True  # before the XREAD is sent: it is not sent (`_run`)
            if self._client_id is not None:
                with contextlib.suppress(Exception):  # none: the XREAD returns in time
                    await self._control.client_unblock(self._client_id)
        return await future

    async def aclose(self) -> None:
        if self._task is None or self._loop is not asyncio.get_running_loop():
            return
        self._closing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._redis.aclose()

    async def _run(self) -> None:
        while not self._closing:
            self._reads = [r for r in self._reads if not r.future.done()]
            if not self._reads:
                self._waiting.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._waiting.wait(), IDLE_S)
                continue
            reads = list(self._reads)
            streams: dict[bytes, StreamId] = {}
            for r in reads:
                streams[r.key] = min(streams.get(r.key, r.after), r.after)
            block = max(1, int((min(r.deadline for r in reads) - time.monotonic()) * 1000))
            ids = {key: b"%d-%d" % after for key, after in streams.items()}  # bytes: no encoding
            self._in_flight, self._unblocked = streams, False
            try:
                if self._client_id is None:
                    self._client_id = await self._redis.client_id()
                if self._unblocked:  # a read came meanwhile that it would not cover
                    continue
                got = await self._redis.xread(ids, max(r.count for r in reads), block)
            except Exception as exc:  # the reads it carried fail, as their own would
                self._client_id = None  # the next command connects afresh
                for r in reads:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            finally:
                self._in_flight = None
            self._hand_out(streams, got or [])
            # the readers just answered read again before the next XREAD is made, so that it
            # covers them (else each would unblock it: an XREAD more per answer)
            await asyncio.sleep(0)

    def _hand_out(self, streams: dict[bytes, StreamId], got: list[Any]) -> None:
        """Each read covered by the XREAD its entries; a read past its deadline []."""
        entries = dict(got)
        now = time.monotonic()
        for r in self._reads:
            if r.future.done():
                continue
            mine = [e for e in entries.get(r.key, ()) if stream_id(e[0]) > r.after]
            if mine and _covers(streams, r):
                r.future.set_result(mine)
            elif r.deadline <= now:
                r.future.set_result([])


def _covers(streams: dict[bytes, StreamId], read: _Read) -> bool:
    """Whether an XREAD of `streams` (key -> the id it reads after) answers `read`: it reads
    the key from the read's id or earlier."""
    return read.key in streams and read.after >= streams[read.key]
