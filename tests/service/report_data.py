"""A hand-built reporting dataset, written straight into jobs, job_metrics, worker_usage,
dead_letters and prices (the write path is tested elsewhere), in a time window and under
names of its own, so it shares a database with other tests.

Window: day 0 and day 1 (`since` = day 0 00:00 UTC, `until` = day 2 00:00 UTC, exclusive).

- tenant A, model X, day 0: 6 done (3 at 10:xx, 3 at 11:xx; the last one with no latencies),
  2 failed ("CUDA OOM: ..."), 1 expired ("deadline passed: ..."), 1 cancelled (12:xx);
  tenant A, model Y (no price), day 0: 2 done (13:xx);
  tenant B, model X, day 1: 11 done (TTFT 1..11 s), 2 failed ("boom", 100 x's).
- just outside: a done job 1 µs before `since`, a failed one at `until`.
- each done job: 10,000 prompt tokens (4,000 cached, 6,000 computed), 2,000 completion,
  12.5 compute seconds; at X's price (3 / 0.75 / 15 per million) list 0.051, cache savings
  0.009; at 2.88 an hour, compute 0.01. Each failed or expired job: 5 s, compute 0.004.
- engine: worker 1 / X at day 0 10:00 and 11:00, worker 2 / Y at day 1 05:00 (idle).
- dead letters: 2 "invalid job" on day 0, 1 "not json" on day 1, 1 at `until`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from storage.db import make_engine
from storage.models import (
    compute_rates_table,
    dead_letters_table,
    job_metrics_table,
    jobs_table,
    prices_table,
    worker_usage_table,
)

DAY, HOUR = timedelta(days=1), timedelta(hours=1)
LIST, SAVINGS, COMPUTE, FAILED_COMPUTE = (Decimal(v) for v in ("0.051", "0.009", "0.01", "0.004"))
# (queue wait, TTFT, total, decode tokens/s) of tenant A's done jobs on model X, day 0
A_X_LATENCIES = [
    (0.01, 0.1, 1.0, 10.0),
    (0.02, 0.2, 2.0, 20.0),
    (0.03, 0.3, 3.0, 30.0),
    (0.04, 0.4, 4.0, 40.0),
    (0.10, 1.0, 10.0, 100.0),
    None,
]
A_Y_LATENCIES = [(0.05, 0.5, 5.0, 50.0), (0.15, 1.5, 15.0, 150.0)]
B_X_LATENCIES = [(t / 10, t, 2 * t, 10 * t) for t in map(float, range(1, 12))]
USAGE = [  # (worker, model, hour offset, busy_s, idle_s, steps, seq_steps, prefill, decode,
    #         recompute, cache queried, cache hit)
    ("w1", "x", 10 * HOUR, 1800.0, 1800.0, 1000, 4000, 5000, 4000, 100, 2000, 500),
    ("w1", "x", 11 * HOUR, 900.0, 2700.0, 300, 600, 1000, 600, 0, 1000, 1000),
    ("w2", "y", DAY + 5 * HOUR, 0.0, 3600.0, 0, 0, 0, 0, 0, 0, 0),
    ("w1", "x", 2 * DAY, 60.0, 0.0, 10, 10, 10, 10, 0, 0, 0),  # outside the window
]


@dataclass
class Dataset:
    """Names (unique per build), the window and the ids of the jobs written."""

    url: str
    base: datetime  # day 0, 00:00 UTC
    names: dict[str, str]  # a, b (tenants), x, y (models), w1, w2 (workers)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # job_metrics rows, in order

    @property
    def since(self) -> datetime:
        return self.base

    @property
    def until(self) -> datetime:
        return self.base + 2 * DAY

    def __getattr__(self, name: str) -> str:
        try:
            return self.__dict__["names"][name]
        except KeyError:
            raise AttributeError(name) from None


Latency = tuple[float, float, float, float] | None


def _metrics(
    ds: Dataset, tenant: str, model: str, status: str, at: datetime, latency: Latency, priced: bool
) -> dict[str, Any]:
    """A job_metrics row (and what its jobs row needs) for one ended job."""
    done = status == "done"
    row: dict[str, Any] = {
        "job_id": uuid.uuid4(),
        "tenant": ds.names[tenant],
        "model": ds.names[model],
        "status": status,
        "worker": ds.w1,
        "device": "cpu",
        "attempts": 1,
        "finished_at": at,
        "prompt_tokens": 10_000 if done else 0,
        "cached_prompt_tokens": 4_000 if done else 0,
        "computed_prompt_tokens": 6_000 if done else 0,
        "completion_tokens": 2_000 if done else 0,
        "compute_s": 12.5 if done else 5.0,
        "list_cost": LIST if done and priced else None,
        "cache_savings": SAVINGS if done and priced else None,
        "compute_cost": (COMPUTE if done else FAILED_COMPUTE) if status != "cancelled" else None,
        "queue_wait_s": None,
        "ttft_s": None,
        "prefill_s": None,
        "decode_s": None,
        "total_s": None,
        "decode_tokens_per_s": None,
        "first_token_at": None,
    }
    if status == "cancelled":
        row["compute_s"] = 0.0
    if latency is not None:
        queue, ttft, total, rate = latency
        row.update(
            queue_wait_s=queue,
            ttft_s=ttft,
            prefill_s=ttft - queue,
            decode_s=total - ttft,
            total_s=total,
            decode_tokens_per_s=rate,
            first_token_at=at - timedelta(seconds=total - ttft),
        )
    return row


def _free_base(url: str) -> datetime:
    """Day 0 of a window in the past (1900-1982: tests that look at "since now" never see it)
    that no earlier dataset in this database uses (windows are drawn at random, and the
    datasets of earlier runs stay), a day either side included."""
    windows = [
        (jobs_table, jobs_table.c.finished_at),
        (dead_letters_table, dead_letters_table.c.received_at),
        (worker_usage_table, worker_usage_table.c.hour),
    ]
    with make_engine(url).connect() as conn:
        while True:
            base = datetime(1900, 1, 1, tzinfo=UTC) + 3 * DAY * (uuid.uuid4().int % 10_000)
            lo, hi = base - DAY, base + 3 * DAY
            used = [
                sa.select(sa.literal(1)).select_from(t).where(at >= lo, at < hi).limit(1)
                for t, at in windows
            ]
            if not any(conn.execute(q).first() for q in used):
                return base


def build(url: str) -> Dataset:
    """Write the dataset into the migrated database at `url`."""
    tag = uuid.uuid4().hex[:8]
    base = _free_base(url)
    names = {k: f"{k}-{tag}" for k in ("a", "b", "x", "y", "w1", "w2")}
    ds = Dataset(url, base, names)
    minute = timedelta(minutes=1)
    errors: dict[uuid.UUID, str | None] = {}

    def add(
        tenant: str,
        model: str,
        status: str,
        at: datetime,
        latency: Any = None,
        error: str | None = None,
    ) -> None:
        row = _metrics(ds, tenant, model, status, at, latency, priced=model == "x")
        ds.jobs.append(row)
        errors[row["job_id"]] = error

    for i, latency in enumerate(A_X_LATENCIES):  # 10:01.. 10:03, 11:04 .. 11:06
        add("a", "x", "done", base + (10 + i // 3) * HOUR + (i + 1) * minute, latency)
    add("a", "x", "failed", base + 12 * HOUR + 1 * minute, error="CUDA OOM: out of memory")
    add("a", "x", "failed", base + 12 * HOUR + 2 * minute, error="CUDA OOM: step 3")
    add("a", "x", "expired", base + 12 * HOUR + 3 * minute, error="deadline passed: 2.0 s late")
    add("a", "x", "cancelled", base + 12 * HOUR + 4 * minute)
    for i, latency in enumerate(A_Y_LATENCIES):
        add("a", "y", "done", base + 13 * HOUR + (i + 1) * minute, latency)
    for i, latency in enumerate(B_X_LATENCIES):
        add("b", "x", "done", base + DAY + 8 * HOUR + i * minute, latency)
    add("b", "x", "failed", base + DAY + 9 * HOUR, error="boom")
    add("b", "x", "failed", base + DAY + 9 * HOUR + minute, error="x" * 100)
    add("a", "x", "done", base - timedelta(microseconds=1), A_X_LATENCIES[0])
    add("a", "x", "failed", ds.until, error="late: by a day")

    with make_engine(url).begin() as conn:
        price = conn.execute(
            sa.insert(prices_table).returning(prices_table.c.id),
            {
                "model": ds.x,
                "effective_from": base - DAY,
                "prompt_per_mtok": Decimal(3),
                "cached_prompt_per_mtok": Decimal("0.75"),
                "completion_per_mtok": Decimal(15),
            },
        ).scalar_one()
        rate = conn.execute(
            sa.insert(compute_rates_table).returning(compute_rates_table.c.id),
            {"target": ds.w1, "effective_from": base - DAY, "per_hour": Decimal("2.88")},
        ).scalar_one()
        conn.execute(
            sa.insert(jobs_table),
            [
                {
                    "id": r["job_id"],
                    "tenant": r["tenant"],
                    "model": r["model"],
                    "params": {},
                    "status": r["status"],
                    "queued_at": r["finished_at"] - DAY,
                    "attempts": 1,
                    "finished_at": r["finished_at"],
                    "worker": r["worker"],
                    "priority": 0,
                    "error": errors[r["job_id"]],
                }
                for r in ds.jobs
            ],
        )
        for r in ds.jobs:
            r.update(
                price_id=price if r["list_cost"] is not None else None,
                rate_id=rate if r["compute_cost"] is not None else None,
            )
        conn.execute(sa.insert(job_metrics_table), ds.jobs)
        keys = (
            "worker",
            "model",
            "hour",
            "busy_s",
            "idle_s",
            "steps",
            "seq_steps",
            "prefill_tokens",
            "decode_tokens",
            "recompute_tokens",
            "cache_queried_tokens",
            "cache_hit_tokens",
        )
        conn.execute(
            sa.insert(worker_usage_table),
            [
                dict(zip(keys, (names[w], names[m], base + offset, *figures), strict=True))
                | {"device": "cpu"}
                for w, m, offset, *figures in USAGE
            ],
        )
        conn.execute(
            sa.insert(dead_letters_table),
            [
                {"received_at": at, "reason": reason, "error": f"{reason}: details"}
                for at, reason in (
                    (base + HOUR, "invalid job"),
                    (base + 2 * HOUR, "invalid job"),
                    (base + DAY, "not json"),
                    (ds.until, "not json"),
                )
            ],
        )
    return ds
