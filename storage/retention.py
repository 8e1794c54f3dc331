"""Retention: delete ended jobs (with their results and facts) and dead letters older than a
cutoff, in small batches so each transaction stays short and the freed space is reused by
later rows after a plain VACUUM (measured in docs/reporting-scale.md, R5)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from storage.db import WRITE_OPTION
from storage.models import batches_table, dead_letters_table, jobs_table
from storage.records import TERMINAL_STATUSES, as_utc

J, B, D = jobs_table, batches_table, dead_letters_table


@dataclass(frozen=True, slots=True)
class Purged:
    jobs: int
    batches: int
    dead_letters: int


def _batched(engine: sa.Engine, table: sa.Table, chosen: sa.Select, batch: int) -> int:
    """Delete the rows `chosen` selects (by primary key), `batch` at a time; how many."""
    key = next(iter(table.primary_key.columns))
    writer = engine.execution_options(**{WRITE_OPTION: True})
    total = 0
    while True:
        ids = chosen.limit(batch).scalar_subquery()
        with writer.begin() as conn:
            deleted = conn.execute(sa.delete(table).where(key.in_(ids))).rowcount
        total += deleted
        if deleted < batch:
            return total


def purge(engine: sa.Engine, before: datetime, batch: int = 20_000) -> Purged:
    """Delete jobs that ended and were queued before `before` (results and `job_metrics`
    go with them), batch rows that ended before it, and older dead letters. Active jobs and
    `worker_usage` (already aggregated per hour) are kept."""
    cut = as_utc(before)
    old_jobs = (
        sa.select(J.c.id)
        .where(J.c.queued_at < cut, J.c.status.in_(TERMINAL_STATUSES))
        .order_by(J.c.queued_at)
    )
    jobs = _batched(engine, J, old_jobs, batch)
    unused = ~sa.exists().where(J.c.batch_id == B.c.id)
    batches = _batched(engine, B, sa.select(B.c.id).where(B.c.finished_at < cut, unused), batch)
    return Purged(jobs, batches, purge_dead_letters(engine, cut, batch))


def purge_dead_letters(engine: sa.Engine, before: datetime, batch: int = 20_000) -> int:
    """Delete dead letters received before `before`; how many."""
    old = sa.select(D.c.id).where(D.c.received_at < as_utc(before))
    return _batched(engine, D, old, batch)
