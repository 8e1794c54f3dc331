"""The reporting facts: one `job_metrics` row per ended job, and worker usage per hour.

Every function here runs inside the caller's transaction, so a job's facts are written
with its status (no triggers: nothing here can fail a write that the job rows would not).
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from storage import webhooks
from storage.db import IDS, chunks, dialect_insert, ids_in
from storage.models import job_metrics_table, jobs_table, worker_usage_table
from storage.prices import Billing
from storage.records import TERMINAL_STATUSES, USAGE_FIGURES, EndedJob, UsageDelta

J, M, W = jobs_table, job_metrics_table, worker_usage_table
_FROM_JOB = (
    "tenant",
    "model",
    "status",
    "worker",
    "attempts",
    "enqueued_at",
    "first_seen_at",
    "finished_at",
)


def settle(conn: sa.Connection, job_ids: Iterable[uuid.UUID]) -> None:
    """Bring the facts rows of these jobs in line with their job rows, for those that ended
    (a row is created on first end; later ends update its status, worker and end time), and
    record the webhook each such end owes (`storage.webhooks.enqueue`: the outbox row)."""
    ids = list(dict.fromkeys(job_ids))
    webhooks.enqueue(conn, ids)
    stmt = _settle_statement(conn.dialect.name)
    for part in chunks(ids):
        conn.execute(stmt, {IDS: part})


@functools.cache
def _settle_statement(dialect: str) -> sa.Insert:
    """The facts rows of the ended jobs among :ids, from their job rows (built once)."""
    chosen = sa.select(J.c.id, *(J.c[c] for c in _FROM_JOB)).where(
        ids_in(J.c.id), J.c.status.in_(TERMINAL_STATUSES)
    )
    stmt = dialect_insert(dialect, M).from_select(["job_id", *_FROM_JOB], chosen)
    changed = {c: stmt.excluded[c] for c in ("status", "worker", "attempts", "finished_at")}
    return stmt.on_conflict_do_update(index_elements=[M.c.job_id], set_=changed)


def record_usage(conn: sa.Connection, usage: Sequence[EndedJob]) -> None:
    """The worker's measurements of settled jobs, billed at the prices in force when each
    ended (list price only for jobs with a result)."""
    if not usage:
        return
    billing = Billing.load(conn, {u.model for u in usage}, {t for u in usage for t in u.targets})
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for u in usage:
        row = {**u.facts(), **billing.bill(u)}
        groups.setdefault(tuple(row), []).append({f"p_{k}": v for k, v in row.items()})
    for names, rows in groups.items():
        conn.execute(_usage_statement(names), rows)


@functools.cache
def _usage_statement(names: tuple[str, ...]) -> sa.Update:
    """The facts `names` of a job's row, bound as `p_<name>` (built once per set of names)."""
    values = {name: sa.bindparam(f"p_{name}") for name in names if name != "job_id"}
    return sa.update(M).where(M.c.job_id == sa.bindparam("p_job_id")).values(values)


def add_worker_usage(conn: sa.Connection, deltas: Sequence[UsageDelta]) -> None:
    """Add engine time and counters to each (worker, model, hour) row."""
    merged: dict[tuple[str, str, Any], UsageDelta] = {}
    for d in deltas:
        key = (d.worker, d.model, d.hour)
        merged[key] = merged[key] + d if key in merged else d
    if merged:
        rows = [dataclasses.asdict(d) for d in merged.values()]
        conn.execute(_worker_usage_statement(conn.dialect.name), rows)


@functools.cache
def _worker_usage_statement(dialect: str) -> sa.Insert:
    """A (worker, model, hour) row inserted, or its figures added to (built once)."""
    stmt = dialect_insert(dialect, W)
    added = {n: W.c[n] + stmt.excluded[n] for n in USAGE_FIGURES}
    return stmt.on_conflict_do_update(
        index_elements=[W.c.worker, W.c.model, W.c.hour],
        set_={**added, "device": stmt.excluded.device},
    )
