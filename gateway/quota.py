"""Per-tenant token quotas (`inferq keys quota TENANT --tpm N --tpd N`): what a request may
use, prompt plus its most output tokens, counted against the tenant's minute and day in one
Lua script on Redis, so that every replica counts together, a request is charged to both
windows or neither, and the windows are Redis's clock (`TIME`), never a host's.

The prompt is counted before any tokenizer sees it: a quarter of its characters, rounded up
(as OpenAI's own limiter estimates), plus `max_tokens`. The counts are fixed windows: the
UTC minute and the UTC day."""

from __future__ import annotations

import math
from typing import Any

import redis.asyncio as aioredis

from gateway.errors import ApiError
from storage.api_keys import TenantKey

QUOTA_PREFIX = "inferq:gateway:tokens:"
CHARS_PER_TOKEN = 4
SPANS = (("minute", 60), ("day", 86_400))

# KEYS: the tenant's minute and day counters (hashes: `window`, `used`). ARGV: the cost and
# the two limits (0: none). Returns {0} when charged; else {which (1 minute, 2 day), seconds
# to that window's end (-1: the cost alone is over the limit), used so far}.
CHARGE = """
local now = redis.call('TIME')
local second = tonumber(now[1])
local cost = tonumber(ARGV[1])
local spans = {60, 86400}
local windows, used = {}, {}
for i = 1, 2 do
  local limit = tonumber(ARGV[i + 1])
  if limit > 0 then
    windows[i] = math.floor(second / spans[i])
    local at = redis.call('HMGET', KEYS[i], 'window', 'used')
    used[i] = 0
    if tonumber(at[1]) == windows[i] then used[i] = tonumber(at[2]) end
    if cost > limit then return {i, -1, used[i]} end
    if used[i] + cost > limit then
      return {i, (windows[i] + 1) * spans[i] - second, used[i]}
    end
  end
end
for i = 1, 2 do
  if windows[i] then
    redis.call('HSET', KEYS[i], 'window', windows[i], 'used', used[i] + cost)
    redis.call('EXPIRE', KEYS[i], spans[i] * 2)
  end
end
return {0}
"""


def token_cost(fields: dict[str, Any]) -> int:
    """What a job's fields may use: its prompt's estimated tokens plus its `max_tokens`."""
    text = fields.get("prompt") or ""
    chars = len(text) + sum(len(m.get("content", "")) for m in fields.get("messages") or [])
    return math.ceil(chars / CHARS_PER_TOKEN) + int(fields["params"]["max_tokens"])


class Quotas:
    """Charges requests to their tenant's quota (one script call per request)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.script = redis.register_script(CHARGE)

    async def charge(self, key: TenantKey, cost: int) -> None:
        """Count `cost` tokens for the key's tenant; 429 (OpenAI's shape, type `tokens`, with
        `Retry-After`) when either window would go over its limit, and then nothing counts."""
        limits = (key.tokens_per_minute or 0, key.tokens_per_day or 0)
        if not any(limits):
            return
        keys = [f"{QUOTA_PREFIX}{key.tenant}:{name}" for name, _ in SPANS]
        got = await self.script(keys=keys, args=[cost, *limits])
        if int(got[0]) == 0:
            return
        which, retry, used = int(got[0]) - 1, int(got[1]), int(got[2])
        name, limit = SPANS[which][0], limits[which]
        text = f"tokens per {name}: limit {limit}, used {used}, requested {cost}"
        if retry < 0:
            raise ApiError(
                429,
                f"Request too large for the quota on {text}. Ask for fewer tokens.",
                code="rate_limit_exceeded",
                type_="tokens",
            )
        raise ApiError(
            429,
            f"Rate limit reached on {text}. Please try again in {retry}s.",
            code="rate_limit_exceeded",
            type_="tokens",
            headers={"Retry-After": str(max(1, retry))},
        )
