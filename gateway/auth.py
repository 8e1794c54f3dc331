"""Who is asking: an `Authorization: Bearer` API key names one tenant (`inferq keys create`),
looked up by its hash in PostgreSQL and cached briefly; and the tenant's optional request
rate, counted in Redis so that every gateway replica counts together."""

from __future__ import annotations

import asyncio
import math
import time

import redis.asyncio as aioredis

from gateway.errors import ApiError
from storage.api_keys import ApiKeys, TenantKey, key_hash

MAX_CACHED = 10_000  # key lookups kept (a flood of bad keys clears the cache, not memory)
RATE_PREFIX = "inferq:gateway:rate:"


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        code="invalid_api_key",
        type_="invalid_request_error",
        headers={"WWW-Authenticate": "Bearer"},
    )


class Authenticator:
    """API key -> tenant, cached `cache_s` (a revoked key stops working within that)."""

    def __init__(self, keys: ApiKeys, cache_s: float) -> None:
        self.keys, self.cache_s = keys, cache_s
        self._cache: dict[str, tuple[TenantKey | None, float]] = {}

    async def tenant(self, authorization: str | None) -> TenantKey:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthorized("You didn't provide an API key (Authorization: Bearer <key>).")
        found = await self._lookup(key.strip())
        if found is None:
            raise _unauthorized("Incorrect API key provided.")
        return found

    async def _lookup(self, key: str) -> TenantKey | None:
        digest, now = key_hash(key), time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        found = await asyncio.to_thread(self.keys.lookup, key)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[digest] = (found, now + self.cache_s)
        return found


async def check_rate(redis: aioredis.Redis, key: TenantKey) -> None:
    """429 with `Retry-After` once a key has made its `rate_limit_rpm` requests this minute
    (fixed one-minute windows on this host's clock; one Redis round trip)."""
    if key.rate_limit_rpm is None:
        return
    now = time.time()
    counter = f"{RATE_PREFIX}{key.id}:{int(now // 60)}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(counter)
        pipe.expire(counter, 120)
        made, _ = await pipe.execute()
    if made > key.rate_limit_rpm:
        retry = max(1, math.ceil(60 - now % 60))
        raise ApiError(
            429,
            f"Rate limit reached: {key.rate_limit_rpm} requests per minute.",
            code="rate_limit_exceeded",
            type_="requests",
            headers={"Retry-After": str(retry)},
        )
