"""Wakes a consumer of an empty queue the moment anything is pushed to its lists, by any
producer (plain Celery included), through Redis's client-side caching invalidations (`CLIENT
TRACKING`, Redis >= 6): a connection that read a key hears when it changes. So a job sent to
an idle worker is taken within a round trip, not up to a poll interval later.

Two RESP2 connections of their own: one listens on `__redis__:invalidate`, the other reads the
lists' lengths with tracking on, redirecting its invalidations to the first. A wait arms the
bell (the lengths read again) only after it rang: arming then waiting has no gap in which a
push could go unheard. Where Redis refuses tracking, `wait` sleeps (the queue is polled).
Redis trouble raises `redis.RedisError`, as every other broker call does.
"""

from __future__ import annotations

import time

import redis

from inferq.logs import get_logger

log = get_logger("inferq.doorbell")
CHANNEL = "__redis__:invalidate"


class Doorbell:
    def __init__(self, pool: redis.ConnectionPool, keys: list[str]):
        self._keys = keys
        # RESP2: an invalidation is a plain pub/sub message on the listener, never a push
        # interleaved with replies (redis-py speaks RESP3 by default)
        options = {**pool.connection_kwargs, "protocol": 2}
        self._listen, self._track = (
            pool.connection_class(**options),
            pool.connection_class(**options),
        )
        self._armed = False
        try:
            self._listen.connect()
            self._listen.send_command("CLIENT", "ID")
            listener = self._listen.read_response()
            self._track.connect()
            self._track.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", listener)
            self._track.read_response()
            self._listen.send_command("SUBSCRIBE", CHANNEL)
            self._listen.read_response()
            self.works = True
        except redis.ResponseError as exc:  # too old, or not allowed: poll instead
            log.warning("doorbell.unavailable", error=str(exc))
            self.close()
            self.works = False

    def wait(self, timeout: float) -> bool:
        """Return when something may have been pushed to the lists (True), or after `timeout`
        (False)."""
        if not self.works:
            time.sleep(timeout)
            return False
        if not self._armed and self._arm():
            return True  # pushed already: take it now
        if not self._listen.can_read(timeout=timeout):
            return False
        while self._listen.can_read(timeout=0):  # each ring once: it reads every message
            self._listen.read_response()
        self._armed = False
        return True

    def _arm(self) -> bool:
        """Read the lists' lengths with tracking on (Redis then tells when one changes);
        True when one is not empty."""
        commands = [("LLEN", key) for key in self._keys]
        self._track.send_packed_command(self._track.pack_commands(commands))
        lengths = [self._track.read_response() for _ in commands]
        self._armed = True
        return any(lengths)

    def close(self) -> None:
        self._listen.disconnect()
        self._track.disconnect()
