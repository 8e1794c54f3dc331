"""`open_source(settings)`: the Redis fast path for a `redis://` broker, kombu for any other."""

from __future__ import annotations

from inferq.settings import Settings, is_redis_url
from worker.broker.kombu_source import KombuSource
from worker.broker.redis_source import RedisSource
from worker.broker.source import Source


def open_source(settings: Settings, worker: str = "", models: list[str] | None = None) -> Source:
    """The source for `settings`' broker; on Redis, `worker` (with `models`) joins the
    affinity registry when affinity is on."""
    if is_redis_url(settings.resolved_broker_url):
        return RedisSource(settings, worker, models or [])
    return KombuSource(settings)
