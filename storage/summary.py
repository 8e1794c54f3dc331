"""Aggregate figures over a set of jobs (the demo's and the client's one-line summary)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.models import JOB_STATUSES, batches_table, job_metrics_table, jobs_table, results_table

J, B, R, M = jobs_table, batches_table, results_table, job_metrics_table


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def summarize(engine: sa.Engine, job_ids: Sequence[uuid.UUID] | None = None) -> dict[str, Any]:
    """Aggregate figures over `job_ids` (None: every job); times are tz-aware UTC."""
    ids = None if job_ids is None else list(dict.fromkeys(job_ids))

    def among(col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        return sa.true() if ids is None else col.in_(ids)

    with engine.connect() as conn:
        counts = dict.fromkeys(JOB_STATUSES, 0)
        firsts: list[datetime] = []
        lasts: list[datetime] = []
        stmt = sa.select(
            J.c.status,
            sa.func.count(),
            sa.func.min(J.c.queued_at),
            sa.func.max(J.c.finished_at),
        ).where(among(J.c.id))
        for status, n, q_min, f_max in conn.execute(stmt.group_by(J.c.status)):
            counts[status] = n
            firsts += [q_min] if q_min else []
            lasts += [f_max] if f_max else []
        totals = sa.select(sa.func.coalesce(sa.func.sum(R.c.completion_tokens), 0))
        tokens = int(conn.scalar(totals.where(among(R.c.job_id))) or 0)
        means = sa.select(sa.func.avg(M.c.queue_wait_s), sa.func.avg(M.c.ttft_s))
        wait, ttft = conn.execute(means.where(among(M.c.job_id))).one()
        used = sa.select(J.c.batch_id).where(among(J.c.id), J.c.batch_id.is_not(None))
        sizes = sa.select(sa.func.count(), sa.func.avg(B.c.size))
        sizes = sizes if ids is None else sizes.where(B.c.id.in_(used))
        batches, mean_size = conn.execute(sizes).one()
    first, last = min(firsts, default=None), max(lasts, default=None)
    elapsed = (last - first).total_seconds() if first and last else None
    return {
        "total": sum(counts.values()),
        "counts": counts,
        "completion_tokens": tokens,
        "mean_queue_wait_s": _float(wait),
        "mean_ttft_s": _float(ttft),
        "first_queued_at": first,
        "last_finished_at": last,
        "elapsed_s": elapsed,
        "completion_tokens_per_s": tokens / elapsed if elapsed else None,
        "batches": int(batches),
        "mean_batch_size": _float(mean_size),
    }
