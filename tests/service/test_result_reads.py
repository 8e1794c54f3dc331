"""`AsyncResultReads` on the real Redis: the reads of one turn of the event loop go out as one
MGET, each handed its own values; a read in a later turn goes in a later MGET; a cancelled
reader leaves the others their values; a Redis that is not there fails each read."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from api_client.result_reads import AsyncResultReads

pytestmark = pytest.mark.services


def _counted(reads: AsyncResultReads) -> list[int]:
    """Spy on the MGETs `reads` sends (the real Redis answers them): the keys of each."""
    sent: list[int] = []
    mget = reads._redis.mget

    async def counting(keys):
        sent.append(len(keys))
        return await mget(keys)

    reads._redis.mget = counting  # type: ignore[method-assign]
    return sent


def test_the_reads_of_one_turn_are_one_mget(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    keys = [f"inferq:test:results:{tag}:{i}" for i in range(50)]
    redis.Redis.from_url(redis_url).mset({k: f"v{i}" for i, k in enumerate(keys[::2])})

    async def main() -> tuple[list[list], list[int], list]:
        client = aioredis.Redis.from_url(redis_url)
        reads = AsyncResultReads(client)
        sent = _counted(reads)
        together = await asyncio.gather(*(reads.read([k, keys[-1]]) for k in keys[:-1]))
        later = await reads.read([keys[0]])
        await client.aclose()
        return together, sent, later

    together, sent, later = asyncio.run(main())
    assert sent == [2 * 49, 1]  # one MGET for the 49 reads made together, one for the later one
    for i, values in enumerate(together):
        expected = f"v{i // 2}".encode() if i % 2 == 0 else None
        assert values == [expected, None]  # keys[-1] (odd index 49) was never set
    assert later == [b"v0"]
    redis.Redis.from_url(redis_url).delete(*keys)


def test_a_cancelled_reader_leaves_the_others_their_values(redis_url: str) -> None:
    key = f"inferq:test:results:{uuid.uuid4().hex[:8]}"
    redis.Redis.from_url(redis_url).set(key, "x")

    async def main() -> list:
        client = aioredis.Redis.from_url(redis_url)
        reads = AsyncResultReads(client)
        gone = asyncio.ensure_future(reads.read([key]))
        kept = asyncio.ensure_future(reads.read([key]))
        await asyncio.sleep(0)  # both waiting on the same MGET
        gone.cancel()
        values = await kept
        await client.aclose()
        return values

    assert asyncio.run(main()) == [b"x"]
    redis.Redis.from_url(redis_url).delete(key)


def test_without_redis_each_read_fails() -> None:
    async def main() -> list:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
        reads = AsyncResultReads(client)
        got = await asyncio.gather(reads.read(["a"]), reads.read(["b"]), return_exceptions=True)
        await client.aclose()
        return got

    got = asyncio.run(main())
    assert len(got) == 2 and all(isinstance(g, redis.ConnectionError) for g in got)
