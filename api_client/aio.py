"""`AsyncInferqClient`: the client for asyncio apps (FastAPI, aiohttp). Same wire contract,
same job ids and same reading code as `InferqClient` (the plans in `api_client.plans`, run
here with `redis.asyncio`); Celery's producer has no asyncio API, so sending runs in a thread.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from functools import cached_property
from typing import Any

import redis.asyncio as aioredis

from api_client import kombu_push, plans
from api_client.notify import AsyncSubscriptions, Watch
from api_client.producer import Producer, tenant_view
from api_client.result_reads import AsyncResultReads
from api_client.results import result_key
from api_client.schema import JobMessage
from api_client.stream_reads import AsyncStreamReads
from inferq.settings import Settings, is_redis_url
from storage.records import JobView


class AsyncInferqClient(Producer):
    """`InferqClient`'s methods as coroutines (and async iterators: `as_completed`,
    `stream`), for one event loop. `await client.aclose()` when done."""

    def for_tenant(
        self, tenant: str, key: str | None = None, *, shared: bool = False
    ) -> AsyncInferqClient:
        """A client for another tenant; `shared`: over this client's Celery app and Redis
        pool (a gateway serving many tenants), so only this one is to be closed."""
        client = AsyncInferqClient(self.settings, tenant, key)
        if shared:
            client.celery.close()
            client.celery = self.celery
            client.__dict__["redis"] = self.redis
            client.__dict__["subscriptions"] = self.subscriptions
            client.__dict__["stream_reads"] = self.stream_reads
            client.__dict__["result_reads"] = self.result_reads
            client.__dict__["broker_redis"] = self.broker_redis
            client._declared, client._reply_to = self._declared, self._reply_to
        return client

    @cached_property
    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.result_url, health_check_interval=30, max_connections=plans.MAX_CONNECTIONS
        )

    @cached_property
    def subscriptions(self) -> AsyncSubscriptions:
        """The one subscription all this client's waits share (`api_client.notify`)."""
        return AsyncSubscriptions(self.result_url)

    @cached_property
    def result_reads(self) -> AsyncResultReads:
        """The result reads of one turn of the loop as one MGET (`api_client.result_reads`)."""
        return AsyncResultReads(self.redis)

    @cached_property
    def stream_reads(self) -> AsyncStreamReads:
        """The one XREAD all this client's stream reads share (`api_client.stream_reads`)."""
        return AsyncStreamReads(self.result_url, self.redis)

    def __init__(
        self, settings: Settings | None = None, tenant: str | None = None, key: str | None = None
    ) -> None:
        super().__init__(settings, tenant, key)
        self._declared: set[str] = set()  # queues whose kombu bindings this client wrote

    async def aclose(self) -> None:
        await asyncio.to_thread(self.celery.close)
        if "subscriptions" in self.__dict__:
            await self.subscriptions.aclose()
        if "stream_reads" in self.__dict__:
            await self.stream_reads.aclose()
        broker = self.__dict__.get("broker_redis")
        if "redis" in self.__dict__:
            await self.redis.aclose()
        if broker is not None and broker is not self.__dict__.get("redis"):
            await broker.aclose()

    async def submit(self, prompt: str | None = None, **job: Any) -> uuid.UUID:
        return await self.send(self.build(prompt, **job))

    async def send(self, msg: JobMessage) -> uuid.UUID:
        """Enqueue a job `build` validated; its id. On a Redis broker: Celery's own message
        pushed in one pipelined round trip (`api_client.kombu_push`), else Celery's
        producer in a thread."""
        await self._push([msg])
        return msg.job_id

    async def _push(self, messages: list[JobMessage]) -> None:
        """Enqueue validated jobs: on a Redis broker in one round trip, in order."""
        if not is_redis_url(self.settings.resolved_broker_url):
            for msg in messages:
                await asyncio.to_thread(self.enqueue, msg)
            return
        queue = self.settings.queue
        async with self.broker_redis.pipeline(transaction=False) as pipe:
            # the bindings once per queue, as Celery's producer declares
            declare = queue not in self._declared
            kombu_push.queue_jobs(pipe, queue, messages, self.key, self._reply_to, declare=declare)
            await pipe.execute()
        self._declared.add(queue)

    @cached_property
    def broker_redis(self) -> aioredis.Redis:
        """The broker's Redis (the results' one when they are the same)."""
        url = self.settings.resolved_broker_url
        if url == self.result_url:
            return self.redis
        return aioredis.Redis.from_url(url, max_connections=plans.MAX_CONNECTIONS)

    async def submit_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[uuid.UUID]:
        """Validate every job first (nothing is enqueued if one is invalid), then enqueue all
        (on a Redis broker in one round trip, so a worker takes them together)."""
        messages = self.build_many(jobs)
        await self._push(messages)
        return [msg.job_id for msg in messages]

    async def get(self, job_id: uuid.UUID | str) -> JobView | None:
        job_id = uuid.UUID(str(job_id))
        return tenant_view(await self.redis.get(result_key(job_id)), job_id, self.tenant)

    async def wait(
        self, job_id: uuid.UUID | str, timeout: float = 60.0, poll: float | None = None
    ) -> JobView:
        return (await self.wait_many([job_id], timeout, poll))[0]

    async def wait_many(
        self, job_ids: Iterable[uuid.UUID | str], timeout: float = 300.0, poll: float | None = None
    ) -> list[JobView]:
        waiting = plans.Waiting(job_ids, self.tenant)
        async for _ in self._run(plans.ended(waiting, timeout, poll or self.poll_s)):
            pass
        return waiting.views()

    def as_completed(
        self, job_ids: Iterable[uuid.UUID | str], timeout: float = 300.0, poll: float | None = None
    ) -> AsyncIterator[JobView]:
        """`async for view in client.as_completed(ids)`: each job's view as it ends."""
        waiting = plans.Waiting(job_ids, self.tenant)
        return self._run(plans.ended(waiting, timeout, poll or self.poll_s))

    async def cancel(self, job_id: uuid.UUID | str, wait: float = 5.0) -> bool:
        plan = plans.cancel(uuid.UUID(str(job_id)), self.tenant, self.key, wait, self.poll_s)
        async with aclosing(self._run(plan)) as answers:
            async for cancelled in answers:
                return bool(cancelled)
        raise AssertionError("the cancel plan emits its answer")

    def stream(self, job_id: uuid.UUID | str, timeout: float = 300.0) -> AsyncIterator[str]:
        """`async for delta in client.stream(job_id)`: see `InferqClient.stream`."""
        return self._run(plans.stream(uuid.UUID(str(job_id)), self.tenant, timeout, self.poll_s))

    async def _run(self, plan: plans.Plan) -> AsyncIterator[Any]:
        """Run a plan with asyncio Redis calls; yield what it emits. Its subscription is a
        share of the client's one (`AsyncSubscriptions`)."""
        watch: Watch | None = None
        reply: Any = None
        try:
            while True:
                try:
                    op = plan.send(reply)
                except StopIteration:
                    return
                reply = None
                match op:
                    case plans.Emit(value):
                        yield value
                    case plans.Read(keys):
                        reply = await self.result_reads.read(keys)
                    case plans.Subscribe(channels):
                        watch = await self.subscriptions.watch(channels, self.poll_s)
                    case plans.Listen(seconds):
                        assert watch is not None
                        reply = await self.subscriptions.wait(watch, seconds)
                    case plans.XRead(key, last_id, count, block_ms):
                        reply = await self.stream_reads.read(key, last_id, count, block_ms)
                    case plans.Send(commands):
                        async with self.redis.pipeline(transaction=False) as pipe:
                            for command in commands:
                                pipe.execute_command(*command)
                            reply = await pipe.execute()
        finally:
            plan.close()
            if watch is not None:
                await self.subscriptions.unwatch(watch)
