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
from storage.claims import expire_due, orphaned
from storage.db import db_now
from storage.models import jobs_table, workers_table
from storage.records import JobStatus
from storage.repository import Repository

J, W = jobs_table, workers_table
MAX_PER_SWEEP = 1000


def resends_error(times: int) -> str:
    """Why a job the sweeper gave up on failed."""
    return f"sent again {times} times (its message lost or refused) without finishing: given up"


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
    callback_url: str | None


_COLUMNS = [J.c[name] for name in StrandedJob.__dataclass_fields__]


class Sweeps:
    """Heartbeats and requeues over a repository's database."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.ended: list[uuid.UUID] = []  # the jobs the last `requeue` expired or failed

    def heartbeat(
        self,
        worker: str,
        models: list[str],
        started_at: datetime | None = None,
        *,
        stopped: bool = False,
        now: datetime | None = None,
        age_s: float = 0.0,
    ) -> datetime:
        """Record that `worker` is alive (or has stopped cleanly), on the database's clock
        (`now` overrides it: tests). `started_at` None: the process started `age_s` ago (a
        worker's jobs started before its start are a dead predecessor's). Returns the
        `started_at` recorded."""
        with self.repo.writer.begin() as conn:
            now = now or db_now(conn)
            started_at = started_at or now - timedelta(seconds=age_s)
            row = {
                "name": worker,
                "started_at": started_at,
                "last_seen_at": now,
                "models": models,
                "stopped_at": now if stopped else None,
            }
            stmt = self.repo.insert(W).values(row)
            stmt = stmt.on_conflict_do_update(
                index_elements=[W.c.name],
                set_={
                    k: stmt.excluded[k]
                    for k in ("started_at", "last_seen_at", "models", "stopped_at")
                },
            )
            conn.execute(stmt)
        return started_at

    def requeue(
        self,
        dead_after_s: float,
        stranded_after_s: float,
        now: datetime | None = None,
        *,
        max_resends: int | None = None,
    ) -> list[StrandedJob]:
        """Jobs to send again, marked `requeued_at` and counted in `resends`: orphaned (see
        `storage.claims.orphaned`: on a worker silent for `dead_after_s`, stopped or started
        again; put back to queued), and queued for
        `stranded_after_s` without having been sent again within that time. Jobs past their
        deadline expire instead; jobs already sent again `max_resends` times fail instead.
        Times are the database's (`now` overrides it: tests)."""
        out: list[StrandedJob] = []
        with self.repo.writer.begin() as conn:
            now = now or db_now(conn)
            dead_cut = now - timedelta(seconds=dead_after_s)
            stranded_cut = now - timedelta(seconds=stranded_after_s)
            orphans = sa.select(J.c.id).where(orphaned(dead_cut))
            stranded = sa.select(J.c.id).where(
                J.c.status == JobStatus.QUEUED,
                J.c.queued_at < stranded_cut,
                sa.or_(J.c.requeued_at.is_(None), J.c.requeued_at < stranded_cut),
            )
            lapsed = conn.scalars(expire_due(now).returning(J.c.id))  # not sent again
            ended = list(lapsed)
            for ids, values in ((orphans, {"status": JobStatus.QUEUED}), (stranded, {})):
                if max_resends is not None:
                    ended += self._give_up(conn, ids, max_resends, now)
                stmt = (
                    sa.update(J)
                    .where(J.c.id.in_(ids.limit(MAX_PER_SWEEP).scalar_subquery()))
                    .values(requeued_at=now, resends=J.c.resends + 1, **values)
                    .returning(*_COLUMNS)
                )
                out += [StrandedJob(*row) for row in conn.execute(stmt)]
            accounting.settle(conn, ended)
        self.ended = ended
        return out

    @staticmethod
    def _give_up(
        conn: sa.Connection, ids: sa.Select, max_resends: int, now: datetime
    ) -> list[uuid.UUID]:
        """Fail the jobs among `ids` already sent again `max_resends` times."""
        stmt = (
            sa.update(J)
            .where(J.c.id.in_(ids.scalar_subquery()), J.c.resends >= max_resends)
            .values(status=JobStatus.FAILED, finished_at=now, error=resends_error(max_resends))
            .returning(J.c.id)
        )
        return list(conn.scalars(stmt))
