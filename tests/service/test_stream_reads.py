"""`AsyncStreamReads` on the real Redis: many streams read at once through one connection and
one XREAD at a time, each reader handed its own entries in order; a reader that joins a key
late from its start gets the whole stream; a read of a key the blocked XREAD does not cover
is answered at once (the XREAD is unblocked), not when the XREAD's block ends; a quiet read
returns [] after its block; a Redis that is not there fails the read."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from api_client.stream_reads import NAME, AsyncStreamReads

pytestmark = pytest.mark.services


def _keys(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"inferq:test:reads:{tag}:{i}" for i in range(n)]


async def _read_all(reads: AsyncStreamReads, key: str, entries: int) -> list[str]:
    """Read `key` from its start until `entries` entries came; their `d` fields."""
    got: list[str] = []
    last: bytes | str = "0-0"
    while len(got) < entries:
        for entry_id, fields in await reads.read(key, last, 1000, 5000):
            last = entry_id
            got.append(fields[b"d"].decode())
    return got


def _shared_connections(url: str) -> int:
    clients = redis.Redis.from_url(url).client_list()
    return sum(c["name"] == NAME for c in clients)


def test_many_streams_one_connection(redis_url: str) -> None:
    keys, per_key = _keys(200), 5

    async def main() -> tuple[list[list[str]], int, int]:
        control = aioredis.Redis.from_url(redis_url)
        reads = AsyncStreamReads(redis_url, control)
        readers = [asyncio.create_task(_read_all(reads, k, per_key)) for k in keys]
        writer = aioredis.Redis.from_url(redis_url)
        for i in range(per_key):
            await asyncio.sleep(0.05)
            async with writer.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.xadd(k, {"d": f"{k[-3:]}-{i}"})
                await pipe.execute()
        texts = await asyncio.wait_for(asyncio.gather(*readers), 30)
        shared = await asyncio.to_thread(_shared_connections, redis_url)
        pool = len(control.connection_pool._available_connections)
        await reads.aclose()
        await writer.delete(*keys)
        await writer.aclose()
        await control.aclose()
        return texts, shared, pool

    texts, shared, pool = asyncio.run(main())
    assert texts == [[f"{k[-3:]}-{i}" for i in range(5)] for k in keys]
    assert shared == 1  # one XREAD connection for 200 readers
    assert pool <= 2  # the unblocks, one at a time (not a connection per stream)


def test_late_reader_from_the_start_and_unblocking(redis_url: str) -> None:
    first, second = _keys(2)

    async def main() -> tuple[list[str], list[str], float]:
        control = aioredis.Redis.from_url(redis_url)
        writer = aioredis.Redis.from_url(redis_url)
        reads = AsyncStreamReads(redis_url, control)
        await writer.xadd(first, {"d": "a"})
        early = await reads.read(first, "0-0", 1000, 10_000)
        # a reader past the first entry blocks (10 s) on `first` ...
        waiting = asyncio.create_task(reads.read(first, early[-1][0], 1000, 10_000))
        await asyncio.sleep(0.2)
        # ... and one from the start of `first` is answered from the start, at once
        t0 = time.monotonic()
        late = [f[b"d"].decode() for _, f in await reads.read(first, "0-0", 1000, 10_000)]
        # a key the blocked XREAD does not cover: its entry comes at once too
        other = asyncio.create_task(reads.read(second, "0-0", 1000, 10_000))
        await asyncio.sleep(0.2)
        await writer.xadd(second, {"d": "b"})
        got = [f[b"d"].decode() for _, f in await asyncio.wait_for(other, 5)]
        took = time.monotonic() - t0
        await writer.xadd(first, {"d": "c"})
        assert [f[b"d"] for _, f in await asyncio.wait_for(waiting, 5)] == [b"c"]
        await reads.aclose()
        await writer.delete(first, second)
        await writer.aclose()
        await control.aclose()
        return late, got, took

    late, got, took = asyncio.run(main())
    assert late == ["a"] and got == ["b"]
    assert took < 3  # not the blocked XREAD's 10 s


def test_quiet_read_returns_empty_after_its_block(redis_url: str) -> None:
    (key,) = _keys(1)

    async def main() -> tuple[list, float]:
        control = aioredis.Redis.from_url(redis_url)
        reads = AsyncStreamReads(redis_url, control)
        t0 = time.monotonic()
        got = await reads.read(key, "0-0", 1000, 300)
        took = time.monotonic() - t0
        await reads.aclose()
        await control.aclose()
        return got, took

    got, took = asyncio.run(main())
    assert got == [] and 0.25 <= took < 2


def test_redis_not_there_fails_the_read() -> None:
    url = "redis://127.0.0.1:1/0"

    async def main() -> None:
        control = aioredis.Redis.from_url(url)
        reads = AsyncStreamReads(url, control)
        with pytest.raises(redis.ConnectionError):
            await reads.read("inferq:test:nowhere", "0-0", 10, 100)
        await reads.aclose()
        await control.aclose()

    asyncio.run(main())
