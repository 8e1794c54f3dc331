"""Webhook deliveries in SQL (docs/webhooks.md): the outbox row a job's end writes in the
transaction that ends it (`enqueue`, from `accounting.settle`), and the senders' claims,
leases, attempt rows and outcomes, all on the database's clock.

A sender claims due deliveries (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite's writers
queue) and leases them: a claimed delivery is due again when the lease ends, so a dead
sender's delivery goes to another. The claim numbers the attempt; the outcome moves the
delivery on only while that claim is still the last one.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from storage.db import IDS, chunks, db_now, dialect_insert, ids_in
from storage.models import (
    jobs_table,
    results_table,
    webhook_attempts_table,
    webhook_deliveries_table,
)
from storage.records import TERMINAL_STATUSES, as_utc

if TYPE_CHECKING:  # the repository settles jobs through `enqueue`: imported by it
    from storage.repository import Repository

J, R, D, A = jobs_table, results_table, webhook_deliveries_table, webhook_attempts_table
#: A delivery's states; an attempt's status is delivered, failed (retried unless the time is
#: up) or refused (the URL, its addresses or the tenant's secrets forbid a POST: final).
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
REFUSED = "refused"
MAX_ERROR_CHARS = 512


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def body_of(row: Any) -> str:
    """The webhook's JSON body for a job that ended (a row of `_ENDED`): the Standard
    Webhooks envelope `{type, timestamp, data}`; `text`, `finish_reason` and `usage` are null
    when the job has no result."""
    has_result = row.r_job_id is not None
    usage = {
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_tokens": row.cached_tokens,
    }
    data = {
        "job_id": str(row.id),
        "tenant": row.tenant,
        "model": row.model,
        "status": row.status,
        "idempotency_key": row.idempotency_key,
        "error": row.error,
        "finished_at": _iso(row.finished_at),
        "text": row.text if has_result else None,
        "finish_reason": row.finish_reason if has_result else None,
        "usage": usage if has_result else None,
    }
    payload = {"type": f"job.{row.status}", "timestamp": _iso(row.finished_at), "data": data}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True)


_ENDED = sa.select(
    J.c.id,
    J.c.tenant,
    J.c.model,
    J.c.status,
    J.c.idempotency_key,
    J.c.error,
    J.c.finished_at,
    R.c.job_id.label("r_job_id"),
    R.c.text,
    R.c.finish_reason,
    R.c.prompt_tokens,
    R.c.completion_tokens,
    R.c.cached_tokens,
).select_from(J.outerjoin(R, R.c.job_id == J.c.id))


def enqueue(conn: sa.Connection, job_ids: Iterable[uuid.UUID]) -> None:
    """In the caller's transaction: a pending delivery for each of these jobs that ended and
    has a callback URL, one per job and status it ended with (a job failed and then done
    gets both). Idempotent."""
    ids = list(dict.fromkeys(job_ids))
    for part in chunks(ids):
        rows = [
            {
                "id": uuid.uuid4(),
                "job_id": r.id,
                "tenant": r.tenant,
                "event": r.status,
                "body": body_of(r),
            }
            for r in conn.execute(_OWED, {IDS: part})
        ]
        if rows:
            now = db_now(conn)
            for row in rows:
                row.update(created_at=now, next_attempt_at=now)
            conn.execute(_outbox_insert(conn.dialect.name), rows)


# The ended jobs among :ids with a callback URL and no delivery row for the status they ended with
_OWED = _ENDED.where(
    ids_in(J.c.id),
    J.c.callback_url.is_not(None),
    J.c.status.in_(TERMINAL_STATUSES),
    ~sa.exists().where(D.c.job_id == J.c.id, D.c.event == J.c.status),
)


@functools.cache
def _outbox_insert(dialect: str) -> sa.Insert:
    """A pending delivery row, unless the job has one for that status (built once)."""
    return dialect_insert(dialect, D).on_conflict_do_nothing(index_elements=[D.c.job_id, D.c.event])


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a sender holds for one attempt (number `attempt`); `claimed_at` is the
    database's clock at the claim: the attempt's start and its `webhook-timestamp`."""

    id: uuid.UUID
    job_id: uuid.UUID
    tenant: str
    url: str | None
    body: str
    attempt: int
    created_at: datetime
    claimed_at: datetime


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt did: `status` delivered (a 2xx answer), failed (retried) or refused
    (given up at once); `error` an error class or a reason, never a URL or a body."""

    status: str
    http_status: int | None = None
    latency_ms: int | None = None
    error: str | None = None


_PENDING = D.c.state == PENDING


def _due(now: datetime) -> tuple[sa.ColumnElement[bool], ...]:
    return _PENDING, D.c.next_attempt_at <= now


class Deliveries:
    """Claims and outcomes over a repository's database."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def due_in_s(self) -> float | None:
        """Seconds (on the database's clock) until the next pending delivery is due: 0 when
        one is due now, None when none is pending. A read, no lock: most looks find nothing."""
        with self.repo.engine.connect() as conn:
            now = db_now(conn)
            first = conn.scalar(sa.select(sa.func.min(D.c.next_attempt_at)).where(_PENDING))
        if first is None:
            return None
        return max(0.0, (as_utc(first) - now).total_seconds())

    def claim(self, worker: str, limit: int, lease_s: float) -> list[Claimed]:
        """Up to `limit` due deliveries, oldest due first, leased to `worker` for `lease_s`
        (due again then, if no outcome comes) and counted as one more attempt."""
        with self.repo.writer.begin() as conn:
            now = db_now(conn)
            due = (
                sa.select(D.c.id)
                .where(*_due(now))
                .order_by(D.c.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            stmt = (
                sa.update(D)
                .where(D.c.id.in_(due.scalar_subquery()))
                .values(
                    attempts=D.c.attempts + 1,
                    next_attempt_at=now + timedelta(seconds=lease_s),
                    leased_by=worker,
                )
                .returning(D.c.id, D.c.job_id, D.c.tenant, D.c.body, D.c.attempts, D.c.created_at)
            )
            rows = conn.execute(stmt).all()
            urls: dict[uuid.UUID, str | None] = {}
            if rows:
                query = sa.select(J.c.id, J.c.callback_url).where(
                    J.c.id.in_([r.job_id for r in rows])
                )
                urls = {i: u for i, u in conn.execute(query)}
        return [
            Claimed(
                r.id, r.job_id, r.tenant, urls.get(r.job_id), r.body, r.attempts, r.created_at, now
            )
            for r in rows
        ]

    def record(
        self,
        claimed: Claimed,
        outcome: Outcome,
        worker: str,
        *,
        retry_in_s: float,
        retry_for_s: float,
    ) -> str | None:
        """The attempt's row, and the delivery moved on if `claimed` is still its last
        claim: delivered; failed for good when refused, or when the retry `retry_in_s` from
        now would come more than `retry_for_s` after the delivery was made; else due again
        then. Returns the delivery's new state (None: another claim has it now, or this
        attempt was recorded before: writing it again changes nothing)."""
        error = outcome.error and outcome.error[:MAX_ERROR_CHARS]
        with self.repo.writer.begin() as conn:
            now = db_now(conn)
            row = dict(
                delivery_id=claimed.id,
                job_id=claimed.job_id,
                tenant=claimed.tenant,
                attempt=claimed.attempt,
                status=outcome.status,
                http_status=outcome.http_status,
                latency_ms=outcome.latency_ms,
                error=error,
                worker=worker,
                started_at=claimed.claimed_at,
            )
            written = conn.execute(
                dialect_insert(conn, A)
                .values(row)
                .on_conflict_do_nothing(index_elements=[A.c.delivery_id, A.c.attempt])
                .returning(A.c.id)
            ).first()
            if written is None:  # written before (a retry after a lost commit): moved then
                return None
            retry_at = now + timedelta(seconds=retry_in_s)
            values: dict[str, Any]
            if outcome.status == DELIVERED:
                values = {"state": DELIVERED, "ended_at": now, "error": None}
            elif outcome.status == REFUSED:
                values = {"state": FAILED, "ended_at": now, "error": f"refused: {error}"}
            elif retry_at > claimed.created_at + timedelta(seconds=retry_for_s):
                spent = (now - claimed.created_at).total_seconds()
                reason = (
                    f"gave up after {claimed.attempt} attempts in {spent:.0f} s (retried "
                    f"for at most {retry_for_s:g} s); the last: {error}"
                )
                values = {"state": FAILED, "ended_at": now, "error": reason}
            else:
                values = {"next_attempt_at": retry_at}
            moved = conn.execute(
                sa.update(D)
                .where(
                    D.c.id == claimed.id,
                    D.c.attempts == claimed.attempt,
                    D.c.state == PENDING,
                )
                .values(values)
            ).rowcount
        return values.get("state", PENDING) if moved else None
