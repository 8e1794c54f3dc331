"""Worker heartbeats and the sweeper's queries: PostgreSQL is the record of every job, so a
job whose message was lost (a broker restarted without persistence, a dead worker) is found
here and sent again."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from storage import accounting
from storage.models import jobs_table, workers_table
from storage.records import ACTIVE_STATUSES, JobStatus, utcnow
from storage.repository import EXPIRED_ERROR, Repository

J, W = jobs_table, workers_table
MAX_PER_SWEEP = 1000


@dataclass(frozen=True, slots=True)
class StrandedJob:
    """What it takes to send a job's message again."""

    id: uuid.UUID
    tenant: str
    model: str
    prompt: str | None
    messages: list[dict[str, Any]] | None
    params: dict[str, Any]
    priority: int
    idempotency_key: str | None
    queued_at: datetime
    expires_at: datetime | None


_COLUMNS = [J.c[name] for name in StrandedJob.__dataclass_fields__]


class Sweeps:
    """Heartbeats and requeues over a repository's database."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def heartbeat(
        self,
        worker: str,
        models: list[str],
        started_at: datetime,
        *,
        stopped: bool = False,
        now: datetime | None = None,
    ) -> None:
        """Record that `worker` is alive (or has stopped cleanly)."""
        now = now or utcnow()
        row = {"name": worker, "started_at": started_at, "last_seen_at": now, "models": models,
               "stopped_at": now if stopped else None}  # fmt: skip
        stmt = self.repo.insert(W).values(row)
        stmt = stmt.on_conflict_do_update(
            index_elements=[W.c.name],
            set_={
                k: stmt.excluded[k] for k in ("started_at", "last_seen_at", "models", "stopped_at")
            },
        )
        with self.repo.writer.begin() as conn:
            conn.execute(stmt)

    def requeue(
        self, dead_after_s: float, stranded_after_s: float, now: datetime | None = None
    ) -> list[StrandedJob]:
        """Jobs to send again, marked `requeued_at`: running on a worker silent (or stopped)
        for `dead_after_s` (put back to queued), and queued for `stranded_after_s` without
        having been sent again within that time. Jobs past their deadline expire instead."""
        now = now or utcnow()
        dead_cut = now - timedelta(seconds=dead_after_s)
        stranded_cut = now - timedelta(seconds=stranded_after_s)
        alive = sa.exists().where(
            W.c.name == J.c.worker, W.c.last_seen_at >= dead_cut, W.c.stopped_at.is_(None)
        )
        orphans = sa.select(J.c.id).where(
            J.c.status == JobStatus.RUNNING, J.c.started_at < dead_cut, ~alive
        )
        stranded = sa.select(J.c.id).where(
            J.c.status == JobStatus.QUEUED,
            J.c.queued_at < stranded_cut,
            sa.or_(J.c.requeued_at.is_(None), J.c.requeued_at < stranded_cut),
        )
        out: list[StrandedJob] = []
        with self.repo.writer.begin() as conn:
            lapsed = conn.scalars(  # past their deadline: expired, not sent again
                sa.update(J)
                .where(J.c.status.in_(ACTIVE_STATUSES), J.c.expires_at <= now)
                .values(status=JobStatus.EXPIRED, finished_at=now, error=EXPIRED_ERROR)
                .returning(J.c.id)
            )
            accounting.settle(conn, list(lapsed))
            for ids, values in ((orphans, {"status": JobStatus.QUEUED}), (stranded, {})):
                stmt = (
                    sa.update(J)
                    .where(J.c.id.in_(ids.limit(MAX_PER_SWEEP).scalar_subquery()))
                    .values(requeued_at=now, **values)
                    .returning(*_COLUMNS)
                )
                out += [StrandedJob(*row) for row in conn.execute(stmt)]
        return out
