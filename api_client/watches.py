"""Who waits on which result channel: the bookkeeping of a client's shared subscription
(`api_client.notify`), without I/O (the readers there do theirs around it)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterable
from typing import Any

from api_client.producer import job_id_of

Value = bytes | str | None  # a result key's value (None: no key)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class Watch:
    """One waiting call: its channels, and the jobs announced since it last looked, each with
    its key's value read after the announcement. `event` (a `threading.Event` or an
    `asyncio.Event`) is set when either changes."""

    __slots__ = ("channels", "event", "woken")

    def __init__(self, channels: Iterable[str], event: threading.Event | asyncio.Event):
        self.channels = list(dict.fromkeys(channels))
        self.event = event
        self.woken: dict[uuid.UUID, Value] = {}

    def take(self) -> dict[uuid.UUID, Value]:
        woken, self.woken = self.woken, {}
        self.event.clear()
        return woken


class Registry:
    """Who watches which channel, and which SUBSCRIBEs Redis has not confirmed yet; no I/O
    (the two readers below do theirs around it)."""

    def __init__(self) -> None:
        self.watchers: dict[str, set[Watch]] = {}
        self.unconfirmed: dict[str, int] = {}  # SUBSCRIBEs sent, not yet confirmed
        self.gone: dict[str, None] = {}  # channels nobody watches, not UNSUBSCRIBEd yet

    def add(self, watch: Watch) -> list[str]:
        """Register a call; the channels to SUBSCRIBE (those nobody watched)."""
        new = [c for c in watch.channels if c not in self.watchers]
        for channel in watch.channels:
            self.watchers.setdefault(channel, set()).add(watch)
        for channel in new:
            self.unconfirmed[channel] = self.unconfirmed.get(channel, 0) + 1
        return new

    def remove(self, watch: Watch) -> None:
        """Forget a call; the channels nobody watches now are UNSUBSCRIBEd later, by the
        reader (`take_gone`): a call that has its result returns without a round trip."""
        for channel in watch.channels:
            watchers = self.watchers.get(channel)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self.watchers[channel]
                    self.gone[channel] = None

    def take_gone(self) -> list[str]:
        """The channels to UNSUBSCRIBE now: left by every call, and not watched again."""
        gone, self.gone = [c for c in self.gone if c not in self.watchers], {}
        return gone

    def confirmed(self, watch: Watch) -> bool:
        return not any(c in self.unconfirmed for c in watch.channels)

    def handle(self, messages: Iterable[dict[str, Any]]) -> tuple[set[Watch], list[str]]:
        """For pub/sub messages: the calls to wake now (a confirmation they wait for, or a
        state announced with its value: the result script SETs the key and PUBLISHes the same
        value atomically, so a notification's payload is the key's value), and the keys to
        read for the others (then `deliver`): a notification without a payload, and a
        confirmation nobody asked for (a resubscription after the connection was lost)."""
        woken: set[Watch] = set()
        unasked: dict[str, None] = {}
        for message in messages:
            kind, channel = message["type"], message["channel"]
            if kind not in ("message", "subscribe") or channel is None:
                continue
            channel = _text(channel)
            if channel not in self.watchers:
                continue
            if kind == "message":
                if message["data"]:
                    woken |= self.deliver([channel], [message["data"]])
                    continue
            elif left := self.unconfirmed.get(channel, 0):
                if left > 1:
                    self.unconfirmed[channel] = left - 1
                else:
                    del self.unconfirmed[channel]
                    woken |= self.watchers[channel]
                continue
            if job_id_of(channel) is not None:  # a bare notification, or unasked for
                unasked[channel] = None
        return woken, list(unasked)

    def deliver(self, keys: list[str], values: list[Value]) -> set[Watch]:
        """The announced keys' values to their calls; the calls to wake."""
        woken: set[Watch] = set()
        for key, value in zip(keys, values, strict=True):
            job_id = job_id_of(key)
            for watch in self.watchers.get(key, ()):
                if job_id is not None:
                    watch.woken[job_id] = value
                    woken.add(watch)
        return woken

    def reconnected(self) -> list[str]:
        """A new connection: every watched channel to SUBSCRIBE again. A channel some call
        still waits to see confirmed gets one confirmation; the others' are unasked for."""
        self.unconfirmed = {c: 1 for c in self.unconfirmed if c in self.watchers}
        self.gone = {}  # the new connection subscribes the watched channels alone
        return list(self.watchers)

    def all(self) -> set[Watch]:
        return {w for watchers in self.watchers.values() for w in watchers}
