"""A batch's lines charged to its tenant's token quota (gateway/quota.py) as they are
enqueued: each line costs what the same request would cost interactively (`token_cost`), and a
chunk of lines is charged in one script call, in line order, each line to both windows or
neither, up to the first that does not fit.

- A line charged is enqueued now.
- A window full: that line and those after it stay unsent (still due), and the driver tries
  again within `recheck_s` (never past the window's end), so a batch goes at its quota's pace
  for as long as its completion window lasts; it stays `in_progress` meanwhile.
- A line whose cost alone is over a limit can never be charged: it is refused (the batch's
  error file, OpenAI's 429 body, `rate_limit_exceeded`) and the lines after it go on.
- A tenant without a quota: nothing is charged, and no Redis round trip.

Each line is charged once: the script notes the batch's lines it charged (a bitmap in Redis,
kept two days, past the 24 h completion window) in the same step as the charge, and a line
noted is not charged again, whether a gateway was killed between charging and noting it as
sent (another resumes the batch), its lease lapsed mid-chunk (another took the batch on), or
a signed tenant's job is enqueued again after the signature window."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field

from api_client.schema import JobMessage
from gateway.quota import Quotas, token_cost
from storage.api_keys import ApiKeys

QUOTA_RECHECK_S = 5.0  # a batch waiting on its quota tries again at least this often
COST_FIELDS = {"prompt", "messages", "params"}


@dataclass(slots=True)
class Charged:
    """What a chunk's charge allows: the lines to enqueue now, those refused for good (with
    their error body, JSON), and how long to wait before trying the rest (None: none left)."""

    send: list[tuple[int, JobMessage]] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    wait_s: float | None = None


class BatchQuota:
    def __init__(self, quotas: Quotas, keys: ApiKeys, recheck_s: float) -> None:
        self.quotas, self.keys, self.recheck_s = quotas, keys, recheck_s

    async def charge(
        self, tenant: str, batch_id: uuid.UUID, jobs: list[tuple[int, JobMessage]]
    ) -> Charged:
        """Charge the batch's lines' jobs (line, job) to the tenant's quota, read now (a quota
        changed while a batch runs applies from its next chunk)."""
        done, fresh = Charged(), jobs
        limits = await asyncio.to_thread(self.keys.quota, tenant) if jobs else (None, None)
        if not any(limits):
            done.send = jobs
            return done
        costs = [token_cost(job.model_dump(include=COST_FIELDS)) for _, job in fresh]
        while fresh:
            once = (batch_id, [n for n, _ in fresh])
            charged, refusal = await self.quotas.charge_each(tenant, limits, costs, once)
            done.send += fresh[:charged]
            if refusal is None:
                break
            if refusal.retry >= 0:  # the window is full: the rest wait for it
                done.wait_s = min(refusal.retry, self.recheck_s)
                break
            done.refused.append((fresh[charged][0], json.dumps(refusal.error.body())))
            fresh, costs = fresh[charged + 1 :], costs[charged + 1 :]
        return done
