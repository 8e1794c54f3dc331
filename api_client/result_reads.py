"""One MGET for the result reads of an `AsyncInferqClient` that come in the same turn of its
event loop: `AsyncResultReads.read(keys)` is what `MGET keys` would answer, but the reads
made while the loop runs one round of ready tasks go out together, as one MGET on one
connection. The quiet stream reads of an app (or gateway) that reads many streams end together
on a grid (`api_client.stream_reads`), and each then reads its job's result: one round trip
for all of them instead of one each. A failed MGET fails the reads it carried, as their own
MGETs would have failed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

_Read = tuple[list[str], "asyncio.Future[list[Any]]"]


class AsyncResultReads:
    """The result reads of one asyncio client, over its Redis (`redis`)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._waiting: dict[asyncio.AbstractEventLoop, list[_Read]] = {}

    async def read(self, keys: list[str]) -> list[Any]:
        """The values of `keys` (None where absent), in their order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        waiting = self._waiting.setdefault(loop, [])
        if not waiting:  # the first of this turn: the MGET goes once the turn's tasks ran
            loop.call_soon(self._send, loop)
        waiting.append((keys, future))
        return await future

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        reads = self._waiting.pop(loop, [])
        if reads:
            loop.create_task(self._mget(reads))

    async def _mget(self, reads: list[_Read]) -> None:
        keys = [key for wanted, _ in reads for key in wanted]
        try:
            values = await self._redis.mget(keys)
        except Exception as exc:  # each read fails, as its own MGET would have
            for _, future in reads:
                if not future.done():
                    future.set_exception(exc)
            return
        at = 0
        for wanted, future in reads:
            if not future.done():  # a reader cancelled meanwhile has gone
                future.set_result(values[at : at + len(wanted)])
            at += len(wanted)
