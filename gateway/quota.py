"""Per-tenant token quotas (`inferq keys quota TENANT --tpm N --tpd N`): what a request may
use, prompt plus its most output tokens, counted against the tenant's minute and day in one
Lua script on Redis, so that every replica counts together, a request is charged to both
windows or neither, and the windows are Redis's clock (`TIME`), never a host's.

The prompt is counted before any tokenizer sees it: a quarter of its characters, rounded up
(as OpenAI's own limiter estimates), plus `max_tokens`. The counts are fixed windows: the
UTC minute and the UTC day. A batch's lines are charged the same way as they are enqueued,
a chunk in one script call (gateway/batch_quota.py)."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from gateway.errors import ApiError
from storage.api_keys import TenantKey

QUOTA_PREFIX = "inferq:gateway:tokens:"
CHARS_PER_TOKEN = 4
SPANS = (("minute", 60), ("day", 86_400))

# KEYS: the tenant's minute and day counters (hashes: `window`, `used`), and for a batch its
# lines already charged (a bitmap by line number). ARGV: the two limits (0: none), the
# bitmap's lifetime (s), then the costs (for a batch: each cost and its line). Charges the
# costs in order until one does not fit, each to both windows or neither (a batch's line
# charged already is not charged again: it counts as charged). Returns {how many were
# charged} when all were; else {how many, which window refused the next (1 minute, 2 day),
# seconds to that window's end (-1: the cost alone is over the limit), used so far in it}.
CHARGE = """
local now = redis.call('TIME')
local second = tonumber(now[1])
local spans = {60, 86400}
local limits, windows, used = {}, {}, {}
for i = 1, 2 do
  limits[i] = tonumber(ARGV[i])
  if limits[i] > 0 then
    windows[i] = math.floor(second / spans[i])
    local at = redis.call('HMGET', KEYS[i], 'window', 'used')
    used[i] = 0
    if tonumber(at[1]) == windows[i] then used[i] = tonumber(at[2]) end
  end
end
local marks = KEYS[3]
local charged, refused = 0, nil
for n = 4, #ARGV, marks and 2 or 1 do
  local cost = tonumber(ARGV[n])
  local due = not (marks and redis.call('GETBIT', marks, ARGV[n + 1]) == 1)
  for i = 1, 2 do
    if due and windows[i] and not refused then
      if cost > limits[i] then
        refused = {i, -1, used[i]}
      elseif used[i] + cost > limits[i] then
        refused = {i, (windows[i] + 1) * spans[i] - second, used[i]}
      end
    end
  end
  if refused then break end
  if due then
    for i = 1, 2 do
      if windows[i] then used[i] = used[i] + cost end
    end
    if marks then redis.call('SETBIT', marks, ARGV[n + 1], 1) end
  end
  charged = charged + 1
end
if charged > 0 then
  for i = 1, 2 do
    if windows[i] then
      redis.call('HSET', KEYS[i], 'window', windows[i], 'used', used[i])
      redis.call('EXPIRE', KEYS[i], spans[i] * 2)
    end
  end
  if marks then redis.call('EXPIRE', marks, ARGV[3]) end
end
if refused then return {charged, refused[1], refused[2], refused[3]} end
return {charged}
"""
MARKS_TTL_S = 2 * 86_400  # a batch's charged lines are remembered past its 24 h window


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a cost was not charged: OpenAI's 429 for it, and the seconds to the end of the
    window that refused it (-1: the cost alone is over the limit, waiting will not help)."""

    error: ApiError
    retry: int


def token_cost(fields: dict[str, Any]) -> int:
    """What a job's fields may use: its prompt's estimated tokens plus its `max_tokens`."""
    text = fields.get("prompt") or ""
    chars = len(text) + sum(len(m.get("content", "")) for m in fields.get("messages") or [])
    return math.ceil(chars / CHARS_PER_TOKEN) + int(fields["params"]["max_tokens"])


class Quotas:
    """Charges requests to their tenant's quota (one script call per request, or per batch
    chunk)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.script = redis.register_script(CHARGE)

    async def charge(self, key: TenantKey, cost: int) -> None:
        """Count `cost` tokens for the key's tenant; 429 (OpenAI's shape, type `tokens`, with
        `Retry-After`) when either window would go over its limit, and then nothing counts."""
        limits = (key.tokens_per_minute, key.tokens_per_day)
        _, refusal = await self.charge_each(key.tenant, limits, [cost])
        if refusal is not None:
            raise refusal.error

    async def charge_each(
        self,
        tenant: str,
        limits: tuple[int | None, int | None],
        costs: list[int],
        once: tuple[uuid.UUID, list[int]] | None = None,
    ) -> tuple[int, Refusal | None]:
        """Charge `costs` in order, each to both windows or neither, until one does not fit:
        how many were charged (from the first), and why the next was not (None: all were).
        `once`: a batch and its lines (one per cost), each charged once for good (a line
        charged before counts as charged, at no cost). Without limits: no Redis round trip."""
        tpm, tpd = limits[0] or 0, limits[1] or 0
        if not (tpm or tpd) or not costs:
            return len(costs), None
        keys = [f"{QUOTA_PREFIX}{tenant}:{name}" for name, _ in SPANS]
        args: list[int] = [tpm, tpd, MARKS_TTL_S]
        if once is None:
            args += costs
        else:
            keys.append(f"{QUOTA_PREFIX}{tenant}:batch:{once[0].hex}")
            args += [n for pair in zip(costs, once[1], strict=True) for n in pair]
        got = await self.script(keys=keys, args=args)
        charged = int(got[0])
        if len(got) == 1:
            return charged, None
        which, retry, used = int(got[1]) - 1, int(got[2]), int(got[3])
        name, limit, cost = SPANS[which][0], (tpm, tpd)[which], costs[charged]
        return charged, Refusal(_refused(f"tokens per {name}", limit, used, cost, retry), retry)


def _refused(name: str, limit: int, used: int, cost: int, retry: int) -> ApiError:
    text = f"{name}: limit {limit}, used {used}, requested {cost}"
    if retry < 0:
        return ApiError(
            429,
            f"Request too large for the quota on {text}. Ask for fewer tokens.",
            code="rate_limit_exceeded",
            type_="tokens",
        )
    return ApiError(
        429,
        f"Rate limit reached on {text}. Please try again in {retry}s.",
        code="rate_limit_exceeded",
        type_="tokens",
        headers={"Retry-After": str(max(1, retry))},
    )
