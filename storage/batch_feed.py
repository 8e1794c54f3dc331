"""What a batch's driver reads and writes (gateway/batch_driver.py): its lease on the batch
(the database's clock: one gateway drives a batch at a time, and a stopped gateway's lease
lapses), its request rows written once each (a line stored again is the same row), and which
lines' jobs are due to be enqueued: never sent, or (a signed tenant's) sent longer ago than
the signature window and not taken by any worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from storage.db import db_now, dialect_insert, make_engine
from storage.gateway_models import (
    api_batch_requests_table,
    api_batches_table,
    file_lines_table,
)
from storage.models import jobs_table

B, R, L, J = api_batches_table, api_batch_requests_table, file_lines_table, jobs_table
DRIVEN = ("validating", "in_progress")  # the statuses a driver moves on


@dataclass(frozen=True, slots=True)
class Lease:
    """A batch held by one driver until `until` (the database's clock)."""

    batch_id: uuid.UUID
    status: str
    until: datetime


def _untaken() -> sa.ColumnElement[bool]:
    """No worker has taken the line's job (it has no `jobs` row)."""
    return ~sa.exists(sa.select(J.c.id).where(J.c.id == R.c.job_id))


def _due(window_s: float | None, now: datetime) -> sa.ColumnElement[bool]:
    """A line whose job is to be enqueued now: never sent; or, with a window (a signed
    tenant's), sent before it and never taken (a worker refuses that message as stale)."""
    never = R.c.sent_at.is_(None)
    if window_s is None:
        return sa.and_(R.c.job_id.is_not(None), never)
    stale = sa.and_(R.c.sent_at < now - timedelta(seconds=window_s), _untaken())
    return sa.and_(R.c.job_id.is_not(None), sa.or_(never, stale))


class BatchFeed:
    def __init__(self, url_or_engine: str | sa.Engine) -> None:
        is_url = isinstance(url_or_engine, str)
        self.engine = make_engine(url_or_engine) if is_url else url_or_engine

    # -- the lease --
    def take(self, batch_id: uuid.UUID, lease_s: float) -> Lease | None:
        """The batch for `lease_s`, if it is driven (validating or in progress) and nobody
        holds it; None otherwise."""
        with self.engine.begin() as conn:
            now = db_now(conn)
            free = sa.or_(B.c.lease_until.is_(None), B.c.lease_until < now)
            row = conn.execute(
                sa.update(B)
                .where(B.c.id == batch_id, B.c.status.in_(DRIVEN), free)
                .values(lease_until=now + timedelta(seconds=lease_s))
                .returning(B.c.status, B.c.lease_until)
            ).first()
        return Lease(batch_id, row.status, row.lease_until) if row else None

    def renew(self, lease: Lease, lease_s: float) -> Lease | None:
        """The lease renewed with the batch's status now; None if it is no longer ours."""
        with self.engine.begin() as conn:
            until = db_now(conn) + timedelta(seconds=lease_s)
            row = conn.execute(
                sa.update(B)
                .where(B.c.id == lease.batch_id, B.c.lease_until == lease.until)
                .values(lease_until=until)
                .returning(B.c.status, B.c.lease_until)
            ).first()
        return Lease(lease.batch_id, row.status, row.lease_until) if row else None

    def release(self, lease: Lease) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(B)
                .where(B.c.id == lease.batch_id, B.c.lease_until == lease.until)
                .values(lease_until=None)
            )

    def to_drive(self, signed: Iterable[str], window_s: float, limit: int = 100) -> list[Any]:
        """Batches no driver holds that want one: (id, tenant) of those validating, or in
        progress with lines due (`_due`; the stale rule for the `signed` tenants only)."""
        signed = list(signed)
        with self.engine.connect() as conn:
            now = db_now(conn)
            due = sa.exists(
                sa.select(R.c.line_no).where(
                    R.c.batch_id == B.c.id,
                    sa.or_(
                        _due(None, now),
                        sa.and_(B.c.tenant.in_(signed), _due(window_s, now)),
                    ),
                )
            )
            query = sa.select(B.c.id, B.c.tenant).where(
                sa.or_(B.c.lease_until.is_(None), B.c.lease_until < now),
                B.c.expires_at > now,
                sa.or_(B.c.status == "validating", sa.and_(B.c.status == "in_progress", due)),
            )
            return list(conn.execute(query.order_by(B.c.created_at).limit(limit)))

    # -- request rows --
    def stored_through(self, batch_id: uuid.UUID) -> int:
        """The last line whose request row is written (rows are written in line order)."""
        with self.engine.connect() as conn:
            last = conn.scalar(sa.select(sa.func.max(R.c.line_no)).where(R.c.batch_id == batch_id))
        return int(last or 0)

    def add_requests(self, batch_id: uuid.UUID, rows: list[dict[str, Any]]) -> None:
        """Write request rows; a line already written stays as it is (one row per line)."""
        if rows:
            with self.engine.begin() as conn:
                insert = dialect_insert(conn, R).on_conflict_do_nothing()
                conn.execute(insert, [{"batch_id": batch_id, **row} for row in rows])

    def due_lines(
        self, batch_id: uuid.UUID, input_file_id: uuid.UUID, window_s: float | None, limit: int
    ) -> list[tuple[int, str]]:
        """Up to `limit` lines due (`_due`), by line number, with their text."""
        with self.engine.connect() as conn:
            now = db_now(conn)
            query = (
                sa.select(R.c.line_no, L.c.body)
                .select_from(
                    R.join(L, sa.and_(L.c.file_id == input_file_id, L.c.line_no == R.c.line_no))
                )
                .where(R.c.batch_id == batch_id, _due(window_s, now))
                .order_by(R.c.line_no)
                .limit(limit)
            )
            return [(row.line_no, row.body) for row in conn.execute(query)]

    def mark_sent(self, batch_id: uuid.UUID, line_nos: list[int]) -> None:
        if line_nos:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.update(R)
                    .where(R.c.batch_id == batch_id, R.c.line_no.in_(line_nos))
                    .values(sent_at=db_now(conn))
                )

    def refuse(self, batch_id: uuid.UUID, line_no: int, error: str) -> None:
        """A line that can no longer become a job: it goes to the error file."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(R)
                .where(R.c.batch_id == batch_id, R.c.line_no == line_no)
                .values(job_id=None, error=error)
            )

    def waiting(self, batch_id: uuid.UUID, window_s: float) -> int:
        """The batch's jobs enqueued within the window and not taken by a worker yet."""
        with self.engine.connect() as conn:
            since = db_now(conn) - timedelta(seconds=window_s)
            query = sa.select(sa.func.count()).where(
                R.c.batch_id == batch_id, R.c.sent_at >= since, _untaken()
            )
            return int(conn.scalar(query) or 0)
