"""One shared subscription per client: every waiting call of an `InferqClient` (a thread
reads) or an `AsyncInferqClient` (a task reads) is told of its jobs' result notifications
through one pub/sub connection, instead of a connection (and a reader) per waiting call.

A waiting call `watch`es its jobs' result channels: the channels nobody watched yet are
SUBSCRIBEd, and `watch` returns once Redis has confirmed every channel of the call (another
call's SUBSCRIBE of the same channel included): only then does the call read its keys, so a
state written between its subscription and its read is not missed (see `api_client.plans`).
`wait` hands it the jobs announced since it last looked, each with its key's value: a
notification carries it (the worker's script SETs the key and PUBLISHes the same value in one
step, as Celery's backend does), so a burst of notifications wakes its calls with no read; only
after a resubscription are the keys read again, in one MGET. The channels no
call watches any more are UNSUBSCRIBEd: by the reader thread of a blocking client, those of
many ended calls in one command (an ended call returns without a round trip); by the ended
call itself on an asyncio client. After the connection was lost (a Redis
restart, a killed client) every channel is subscribed again and its key read again for its
calls (what was published in between is lost, what was written is not); the calls' own
re-reads every `INFERQ_RESULT_POLL_S` stay the fallback for anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio as aioredis

from api_client.watches import Registry, Value, Watch

NAME = "inferq-notify"  # the shared connections' name (CLIENT LIST)
READ_S = 1.0  # the reader looks at `closed` (and pings, when idle long enough) this often
PING_S = 30.0  # a silently dead connection is found after at most this long idle
RETRY_S = (0.05, 2.0)  # backoff after a failed connection: first and longest wait
BURST = 256  # notifications read before the calls they announce are woken


async def _until(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, 0.0)):
            await event.wait()
    return event.is_set()


class Subscriptions:
    """The shared subscription of a blocking client: one connection, one reader thread
    (started with the first watch)."""

    def __init__(self, url: str) -> None:
        # A connection of its own (no health check from redis-py: its PING would be sent
        # by the reader while a waiting call sends a SUBSCRIBE; the reader pings here).
        self._redis = redis.Redis.from_url(url, client_name=NAME, health_check_interval=0)
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the registry, and every command sent on the connection
        self._registry = Registry()
        self._pubsub = self._redis.pubsub()
        self._closed = False
        self._broken = False  # the connection failed beyond redis-py's own retries
        self._thread: threading.Thread | None = None

    def watch(self, channels: Iterable[str], confirm_s: float) -> Watch:
        """Register a waiting call; returns once its channels are subscribed (or after
        `confirm_s`: then its re-reads are the fallback)."""
        if self._pid != os.getpid() or self._closed:  # a forked child (the parent's reader
            self._start()  # is not here), or a client used again after `close`
        watch = Watch(channels, threading.Event())
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._read, name="inferq-notify", daemon=True
                )
                self._thread.start()
            new = self._registry.add(watch)
            try:
                if new:
                    try:
                        self._pubsub.subscribe(*new)
                    except redis.ConnectionError:  # it died under us: a new one, all channels
                        self._resubscribe()
            except BaseException:  # Redis is away: the call fails, as a read would
                self._registry.remove(watch)
                raise
        deadline = time.monotonic() + confirm_s
        while True:
            with self._lock:
                if self._registry.confirmed(watch) or self._closed:
                    return watch
                watch.event.clear()  # `wait` looks at `woken` first: nothing is lost
            left = deadline - time.monotonic()
            if left <= 0:
                return watch
            watch.event.wait(left)

    def wait(self, watch: Watch, seconds: float) -> dict[uuid.UUID, Value]:
        """The jobs announced since the call last looked, with their keys' values read after
        the announcement (waiting up to `seconds` for one)."""
        if not watch.woken:
            watch.event.wait(seconds)
        with self._lock:
            return watch.take()

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            self._registry.remove(watch)

    def _unsubscribe(self) -> None:
        """UNSUBSCRIBE the channels that ended calls left, in one command (the reader)."""
        with self._lock:
            gone = self._registry.take_gone()
            if gone and not self._broken and not self._closed:
                try:
                    self._pubsub.unsubscribe(*gone)
                except redis.RedisError:
                    self._broken = True  # the reader starts again on a new connection

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for watch in self._registry.all():
                watch.event.set()
            self._pubsub.reset()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(READ_S + 1)
        self._redis.close()

    def _read(self) -> None:
        idle_since, retry = time.monotonic(), RETRY_S[0]
        while not self._closed:
            try:
                if self._broken:
                    self._reconnect()
                messages = self._messages()
            except Exception:
                if self._closed:
                    return
                self._broken = True
                time.sleep(retry)
                retry = min(retry * 2, RETRY_S[1])
                continue
            retry = RETRY_S[0]
            self._unsubscribe()
            if messages:
                idle_since = time.monotonic()
                with self._lock:
                    woken, keys = self._registry.handle(messages)
                if keys:
                    try:
                        values = self._redis.mget(keys)
                    except Exception:  # read again after a reconnect (unasked confirmations)
                        self._broken = True
                        keys, values = [], []
                    with self._lock:
                        woken |= self._registry.deliver(keys, values)
                for watch in woken:
                    watch.event.set()
            elif time.monotonic() - idle_since > PING_S:
                idle_since = time.monotonic()
                with self._lock:
                    if self._pubsub.subscribed:
                        self._pubsub.ping()

    def _messages(self) -> list[dict[str, Any]]:
        """What came within READ_S: the first message and all that followed it at once."""
        out = []
        message = self._pubsub.get_message(timeout=READ_S)
        while message is not None:
            out.append(message)
            if len(out) >= BURST:
                break
            message = self._pubsub.get_message(timeout=0.0)
        return out

    def _reconnect(self) -> None:
        with self._lock:
            self._resubscribe()

    def _resubscribe(self) -> None:
        """A new connection, every watched channel subscribed again (the lock held)."""
        self._pubsub.reset()
        channels = self._registry.reconnected()
        if channels:
            self._pubsub.subscribe(*channels)
        self._broken = False


class AsyncSubscriptions:
    """The shared subscription of an asyncio client: one connection, one reader task on the
    event loop of the first watch (a watch from another loop starts afresh there)."""

    def __init__(self, url: str) -> None:
        self._redis = aioredis.Redis.from_url(url, client_name=NAME, health_check_interval=0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._flush: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._registry = Registry()
        self._pubsub = self._redis.pubsub()
        self._subscribed = asyncio.Event()  # the reader has a connection to read
        self._sending = asyncio.Lock()  # one command at a time (the first one connects)
        self._broken = False
        self._closing = False  # the reader's own way out: a cancel can be lost (below)
        self._flush = None  # the task sending the UNSUBSCRIBEs of ended calls
        self._task = self._loop.create_task(self._read(), name="inferq-notify")

    async def watch(self, channels: Iterable[str], confirm_s: float) -> Watch:
        if self._loop is not asyncio.get_running_loop() or self._task is None or self._task.done():
            self._start()
        watch = Watch(channels, asyncio.Event())
        new = self._registry.add(watch)
        try:
            if new:
                try:
                    async with self._sending:
                        await self._pubsub.subscribe(*new)
                    self._subscribed.set()
                except redis.ConnectionError:  # it died under us: a new one, all channels
                    await self._reconnect()
        except BaseException:  # Redis is away: the call fails, as a read would
            self._registry.remove(watch)
            raise
        deadline = time.monotonic() + confirm_s
        while not self._registry.confirmed(watch):
            watch.event.clear()
            if not await _until(watch.event, deadline - time.monotonic()):
                break
        return watch

    async def wait(self, watch: Watch, seconds: float) -> dict[uuid.UUID, Value]:
        if not watch.woken:
            await _until(watch.event, seconds)
        return watch.take()

    async def unwatch(self, watch: Watch) -> None:
        """Forget a call, which returns at once: the channels nobody watches now are
        UNSUBSCRIBEd by one flush task, those of every call that ended meanwhile in one command
        (an UNSUBSCRIBE per ended call, one after another, made the last of 1,000 calls a burst
        ended wait for 999 sends; the reader task sends nothing: an UNSUBSCRIBE from it,
        cancelled by `aclose`, left redis-py's reader hanging)."""
        self._registry.remove(watch)
        if self._registry.gone and (self._flush is None or self._flush.done()):
            self._flush = asyncio.get_running_loop().create_task(self._unsubscribe())

    async def _unsubscribe(self) -> None:
        await asyncio.sleep(0)  # the other calls the same burst ended leave first
        if self._task is None or self._task.done():
            return
        try:
            async with self._sending:  # taken under the lock: a SUBSCRIBE sent since counts
                gone = self._registry.take_gone()
                if gone and not self._broken:
                    await self._pubsub.unsubscribe(*gone)
        except redis.RedisError:
            self._broken = True

    async def aclose(self) -> None:
        if self._task is not None and self._loop is asyncio.get_running_loop():
            # On Python 3.11 a cancel that meets the reader's read timeout can be taken for
            # the timeout's own and dropped; the flag ends the reader's loop then (within
            # READ_S), so this await cannot wait forever.
            self._closing = True
            if self._flush is not None and not self._flush.done():
                await asyncio.wait({self._flush}, timeout=READ_S)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            await self._pubsub.aclose()
        await self._redis.aclose()

    async def _read(self) -> None:
        idle_since, retry = time.monotonic(), RETRY_S[0]
        while not self._closing:
            try:
                if self._broken:
                    await self._reconnect()
                messages = await self._messages()
            except Exception:  # the connection failed: a new one, every channel again
                self._broken = True
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_S[1])
                continue
            retry = RETRY_S[0]
            if messages:
                idle_since = time.monotonic()
                woken, keys = self._registry.handle(messages)
                if keys:
                    try:
                        woken |= self._registry.deliver(keys, await self._redis.mget(keys))
                    except Exception:  # read again after a reconnect (unasked confirmations)
                        self._broken = True
                for watch in woken:
                    watch.event.set()
            elif time.monotonic() - idle_since > PING_S and self._pubsub.subscribed:
                idle_since = time.monotonic()
                async with self._sending:
                    await self._pubsub.ping()

    async def _messages(self) -> list[dict[str, Any]]:
        if self._pubsub.connection is None:
            await _until(self._subscribed, READ_S)
            return []
        out = []
        message = await self._pubsub.get_message(timeout=READ_S)
        while message is not None:
            out.append(message)
            if len(out) >= BURST:
                break
            message = await self._pubsub.get_message(timeout=0.0)
        return out

    async def _reconnect(self) -> None:
        async with self._sending:
            await self._pubsub.aclose()
            self._subscribed.clear()
            channels = self._registry.reconnected()
            if channels:
                await self._pubsub.subscribe(*channels)
                self._subscribed.set()
            self._broken = False
