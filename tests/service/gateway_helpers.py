"""Helpers for the gateway tests: the app under a real uvicorn on a free loopback port (so the
official SDKs talk real HTTP to it), API keys, and token quotas' counters in Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import uvicorn

from gateway import create_app
from gateway.quota import QUOTA_PREFIX
from storage.api_keys import ApiKeys


@contextmanager
def serving(settings) -> Iterator[str]:
    """`inferq serve` in this process (a thread) on `settings`; yields its `/v1` base URL."""
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def new_key(settings, tenant: str, rpm: int | None = None) -> str:
    """A fresh API key for `tenant` in the settings' database."""
    return ApiKeys(settings.database_url).create(tenant, rpm)[1]


def quota_used(settings, tenant: str, window: str) -> int:
    """The tokens counted in the tenant's current `minute` or `day` counter."""
    raw = redis.Redis.from_url(settings.broker_url).hget(f"{QUOTA_PREFIX}{tenant}:{window}", "used")
    return int(raw or 0)


def not_near_a_minute_end(settings) -> None:
    """Wait (up to 20 s) so the test's requests fall in one minute of Redis's clock."""
    seconds, _ = redis.Redis.from_url(settings.broker_url).time()
    if seconds % 60 > 40:
        time.sleep(61 - seconds % 60)
