"""Who may run a job: the liveness rule shared by the intake's claim and the sweeper, and the
claim's statements. Times are the database's (`storage.db.db_now`), never a host's: one
host's fast clock must not make every other worker look dead."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from storage.db import chunks
from storage.models import jobs_table, workers_table
from storage.records import ACTIVE_STATUSES, CONTENT_COLUMNS, JobState, JobStatus
from storage.views import read_views

J, W = jobs_table, workers_table
EXPIRED_ERROR = "its deadline passed before it finished"
#: How long a job a worker started counts as live, at least (`worker_dead_after_s`).
DEFAULT_LIVE_FOR_S = 60.0
_CONTENT = [J.c[name] for name in CONTENT_COLUMNS]


def worker_alive(cut: datetime) -> sa.ColumnElement[bool]:
    """The job's worker has beaten since `cut` and has not stopped."""
    return sa.exists().where(
        W.c.name == J.c.worker, W.c.last_seen_at >= cut, W.c.stopped_at.is_(None)
    )


def worker_gone() -> sa.ColumnElement[bool]:
    """The job's worker stopped (handing its messages back), or started again since the job
    started (a process of the same name: the job's process is dead)."""
    return sa.exists().where(
        W.c.name == J.c.worker,
        sa.or_(W.c.stopped_at.is_not(None), W.c.started_at > J.c.started_at),
    )


def orphaned(cut: datetime) -> sa.ColumnElement[bool]:
    """Running on a worker that is gone, or started before `cut` on a worker not alive (one
    started since is live: its worker may not have beaten yet)."""
    silent = sa.and_(J.c.started_at < cut, ~worker_alive(cut))
    return sa.and_(J.c.status == JobStatus.RUNNING, sa.or_(worker_gone(), silent))


def takeable(now: datetime, live_for_s: float) -> sa.ColumnElement[bool]:
    """What a worker may claim: queued or orphaned. A job running live, on another worker or
    on the claiming one (a claim repeated after a database error, a duplicate message),
    stays where it is: that worker holds its message."""
    return sa.or_(J.c.status == JobStatus.QUEUED, orphaned(now - timedelta(seconds=live_for_s)))


def expire_due(now: datetime, *where: sa.ColumnElement[bool]) -> sa.Update:
    """Active jobs (among `where`) whose deadline is `now` or earlier: expired."""
    return (
        sa.update(J)
        .where(*where, J.c.status.in_(ACTIVE_STATUSES), J.c.expires_at <= now)
        .values(status=JobStatus.EXPIRED, finished_at=now, error=EXPIRED_ERROR)
    )


def stored_contents(
    conn: sa.Connection, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[Any, ...]]:
    """The stored `NewJob.content()` of each job among `ids`."""
    out: dict[uuid.UUID, tuple[Any, ...]] = {}
    for part in chunks(ids):
        rows = conn.execute(sa.select(J.c.id, *_CONTENT).where(J.c.id.in_(part)))
        out.update((row[0], tuple(row[1:])) for row in rows)
    return out


def take(
    conn: sa.Connection, ids: Sequence[uuid.UUID], worker: str, now: datetime, live_for_s: float
) -> None:
    """Expire the jobs among `ids` past their deadline; mark the takeable rest running for
    `worker` (attempts + 1), all in the statement that decides it."""
    for part in chunks(ids):
        conn.execute(expire_due(now, J.c.id.in_(part)))
        conn.execute(
            sa.update(J)
            .where(J.c.id.in_(part), takeable(now, live_for_s))
            .values(
                status="running",
                attempts=J.c.attempts + 1,
                started_at=now,
                worker=worker,
                first_seen_at=sa.func.coalesce(J.c.first_seen_at, now),
            )
        )


def release(conn: sa.Connection, ids: Sequence[uuid.UUID], worker: str, now: datetime) -> int:
    """Jobs `worker` claimed and hands back unrun (a drain, a scale-in): queued again, their
    attempt not counted, marked sent at `now` (`requeued_at`): the next worker's claim takes
    them at once, no sweeper resends them. Rows that ended or moved on stay as they are."""
    released = 0
    for part in chunks(ids):
        released += conn.execute(
            sa.update(J)
            .where(J.c.id.in_(part), J.c.worker == worker, J.c.status == JobStatus.RUNNING)
            .values(
                status=JobStatus.QUEUED,
                attempts=J.c.attempts - 1,
                started_at=None,
                worker=None,
                requeued_at=now,
            )
        ).rowcount
    return released


def claim_states(
    conn: sa.Connection, ids: set[uuid.UUID], contents: Mapping[uuid.UUID, tuple[Any, ...]]
) -> dict[uuid.UUID, JobState]:
    """The state of each job among `ids`, with its content where `contents` has it, and the
    job as the claim leaves it (`JobState.view`: what the result publisher writes)."""
    return {
        i: JobState(i, JobStatus(v.status), v.attempts, v.worker, v.expires_at, contents.get(i), v)
        for i, v in read_views(conn, ids).items()
    }
