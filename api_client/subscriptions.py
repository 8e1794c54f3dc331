"""One Redis subscription for all of an `AsyncInferqClient`'s waiting calls: a call adds its
result channels and gets a queue; one reader task hands each notification to the queues of
the calls waiting on that channel. So a thousand concurrent waits (a gateway's requests)
hold one Redis connection, not one each, and a wait costs no connect and close. What a
notification means is unchanged: it only says which key to read again (api_client.plans);
while the connection is down the waits' periodic reads carry them."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from api_client.producer import job_id_of

RECONNECT_S = 0.5  # pause after a failed read before the next (the client reconnects)


class Subscriptions:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._pubsub: aioredis.client.PubSub | None = None
        self._reader: asyncio.Task | None = None
        self._routes: dict[str, set[asyncio.Queue[str]]] = {}
        self._lock = asyncio.Lock()

    async def add(self, channels: list[str]) -> asyncio.Queue[str]:
        """Subscribe a waiting call to `channels`: its queue of notified channels."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        async with self._lock:
            new = [c for c in dict.fromkeys(channels) if c not in self._routes]
            for channel in channels:
                self._routes.setdefault(channel, set()).add(queue)
            if self._pubsub is None:
                self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            if new:
                await self._pubsub.subscribe(*new)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read())
        return queue

    async def remove(self, channels: list[str], queue: asyncio.Queue[str]) -> None:
        """The call is done: channels no call waits on any more are unsubscribed."""
        async with self._lock:
            gone = []
            for channel in dict.fromkeys(channels):
                waiting = self._routes.get(channel)
                if waiting is not None:
                    waiting.discard(queue)
                    if not waiting:
                        del self._routes[channel]
                        gone.append(channel)
            if gone and self._pubsub is not None:
                await self._pubsub.unsubscribe(*gone)

    @staticmethod
    async def listen(queue: asyncio.Queue[str], seconds: float) -> set[uuid.UUID]:
        """The jobs announced on the call's channels within `seconds` (all that came)."""
        woken: set[uuid.UUID] = set()
        try:
            channel = await asyncio.wait_for(queue.get(), timeout=seconds)
        except TimeoutError:
            return woken
        while True:
            if (job_id := job_id_of(channel)) is not None:
                woken.add(job_id)
            if queue.empty():
                return woken
            channel = queue.get_nowait()

    async def _read(self) -> None:
        assert self._pubsub is not None
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                await asyncio.sleep(RECONNECT_S)
                continue
            if message is None or message.get("type") != "message":
                continue
            raw = message["channel"]
            channel = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            for queue in self._routes.get(channel, ()):
                queue.put_nowait(channel)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()
