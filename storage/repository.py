"""The repository: every read and write of jobs, batches, results and metrics.

Writes are bulk Core statements (one per table per call, executemany where there are many
rows) inside one transaction per method; on SQLite a write transaction starts with
``BEGIN IMMEDIATE`` so concurrent writers queue on the busy timeout instead of failing.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from storage import accounting
from storage.claims import (
    DEFAULT_LIVE_FOR_S,
    EXPIRED_ERROR,
    claim_states,
    release,
    stored_contents,
    take,
    takeable,
)
from storage.db import WRITE_OPTION, chunks, db_now, dialect_insert, make_engine
from storage.models import (
    batches_table,
    dead_letters_table,
    job_metrics_table,
    jobs_table,
    results_table,
)
from storage.records import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    BatchRecord,
    EndedJob,
    JobState,
    JobStatus,
    JobView,
    MetricsRow,
    NewJob,
    ResultRow,
    UsageDelta,
    same_content,
    utcnow,
)
from storage.summary import summarize
from storage.views import read_views

__all__ = [
    "EXPIRED_ERROR",
    "BatchRecord",
    "EndedJob",
    "JobState",
    "JobView",
    "MetricsRow",
    "NewJob",
    "Repository",
    "ResultRow",
]

J, B, R, M = jobs_table, batches_table, results_table, job_metrics_table
D = dead_letters_table
MAX_ERROR_CHARS = 4096  # of a dead letter's error text (a validation error can be megabytes)


def _status_in(statuses: Iterable[str]) -> sa.ColumnElement[bool]:
    """`status IN (...)` spelled as ORs: executemany() takes no expanding IN lists."""
    return sa.or_(*(J.c.status == s for s in sorted(statuses)))


def _of(tenant: str | None) -> sa.ColumnElement[bool]:
    """Rows of `tenant`, or every row."""
    return sa.true() if tenant is None else J.c.tenant == tenant


@dataclasses.dataclass(frozen=True)
class _OutcomeStatements:
    """The result sink's writes of one commit, built once per dialect (`store_outcomes`)."""

    batches: sa.Insert  # a batch row inserted, or every figure of the row with its id replaced
    results: sa.Insert  # a result row, unless the job has one; RETURNING the job ids written
    done: sa.Update  # a job with a new result marked done (unless cancelled or expired)


@functools.cache
def _outcome_statements(dialect: str) -> _OutcomeStatements:
    batches = dialect_insert(dialect, B)
    figures = {c.name: batches.excluded[c.name] for c in B.columns if c.name != "id"}
    results = dialect_insert(dialect, R).on_conflict_do_nothing(index_elements=[R.c.job_id])
    done = (
        sa.update(J)
        .where(J.c.id == sa.bindparam("p_id"), _status_in(ACTIVE_STATUSES | {"failed"}))
        .values(
            status="done",
            finished_at=sa.bindparam("p_at"),
            batch_id=sa.bindparam("p_batch"),
            error=None,
        )
    )
    return _OutcomeStatements(
        batches.on_conflict_do_update(index_elements=[B.c.id], set_=figures),
        results.returning(R.c.job_id),
        done,
    )


def _capped(error: str) -> str | None:
    """A dead letter's error text, cut to `MAX_ERROR_CHARS` (saying how long it was)."""
    if len(error) <= MAX_ERROR_CHARS:
        return error or None
    note = f" ... [cut: {len(error)} characters in all]"
    return error[: MAX_ERROR_CHARS - len(note)] + note


class Repository:
    """Storage API over a SQLAlchemy engine (PostgreSQL or SQLite); safe across threads."""

    def __init__(self, url_or_engine: str | sa.Engine) -> None:
        if isinstance(url_or_engine, str):
            url_or_engine = make_engine(url_or_engine)
        self.engine: sa.Engine = url_or_engine
        # write transactions (on SQLite they begin IMMEDIATE)
        self.writer = self.engine.execution_options(**{WRITE_OPTION: True})

    def insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        """An INSERT with this dialect's ON CONFLICT clauses."""
        return dialect_insert(self.engine, table)

    @staticmethod
    def _existing(conn: sa.Connection, jobs: Iterable[NewJob]) -> dict[uuid.UUID, uuid.UUID]:
        """Map each job to the stored job with its id, else with its (tenant, key)."""
        jobs = list(jobs)
        out: dict[uuid.UUID, uuid.UUID] = {}
        ids = list({j.id for j in jobs})
        for part in chunks(ids):
            out.update((i, i) for i in conn.scalars(sa.select(J.c.id).where(J.c.id.in_(part))))
        keyed = [j for j in jobs if j.id not in out and j.idempotency_key is not None]
        pairs = list({(j.tenant, j.idempotency_key) for j in keyed})
        found: dict[tuple[str, str], uuid.UUID] = {}
        key_cols = sa.tuple_(J.c.tenant, J.c.idempotency_key)
        for part in chunks(pairs):
            rows = conn.execute(
                sa.select(J.c.tenant, J.c.idempotency_key, J.c.id).where(key_cols.in_(part))
            )
            found.update(((t, k), i) for t, k, i in rows)
        for j in keyed:
            if (j.tenant, j.idempotency_key) in found:
                out[j.id] = found[(j.tenant, j.idempotency_key)]
        return out

    # -- submission ----------------------------------------------------------------------

    def submit(self, job: NewJob) -> tuple[uuid.UUID, bool]:
        """Insert a queued job; on an id or (tenant, key) clash return (existing id, False)."""
        stmt = self.insert(J).values(job.row()).on_conflict_do_nothing().returning(J.c.id)
        with self.writer.begin() as conn:
            if conn.execute(stmt).first() is not None:
                return job.id, True
            existing = self._existing(conn, [job]).get(job.id)
        if existing is None:  # the clashing row vanished in between: try again
            return self.submit(job)
        return existing, False

    def record_dead_letter(
        self, reason: str, payload: dict[str, Any], error: str = "", *, job_id: uuid.UUID | None
    ) -> int:
        """Keep a message that cannot run (its raw payload and why) instead of dropping it;
        the error text is cut at `MAX_ERROR_CHARS`. Returns the row's id."""
        row = {
            "reason": reason[:128],
            "error": _capped(error),
            "job_id": job_id,
            "payload": payload,
        }
        with self.writer.begin() as conn:
            return conn.scalar(sa.insert(dead_letters_table).values(row).returning(D.c.id))

    def rewrite_dead_letter(self, row_id: int, payload: dict[str, Any], error: str = "") -> None:
        """Replace a dead letter's payload and error (a row that folds many messages)."""
        with self.writer.begin() as conn:
            conn.execute(
                sa.update(D).where(D.c.id == row_id).values(error=_capped(error), payload=payload)
            )

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent dead letters, newest first."""
        query = sa.select(D).order_by(D.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def cancel(self, job_id: uuid.UUID, tenant: str | None = None) -> bool:
        """Cancel a queued or running job (of `tenant`, when given); True if it was still one
        of those. A worker drops a running job it sees cancelled; a result that races in
        anyway is kept, but the job stays cancelled."""
        stmt = (
            sa.update(J)
            .where(J.c.id == job_id, J.c.status.in_(ACTIVE_STATUSES), _of(tenant))
            .values(status="cancelled", finished_at=utcnow())
            .returning(J.c.id)
        )
        with self.writer.begin() as conn:
            if conn.execute(stmt).first() is None:
                return False
            accounting.settle(conn, [job_id])
            return True

    # -- worker side ---------------------------------------------------------------------

    def claim(
        self,
        jobs: Sequence[NewJob],
        worker: str,
        refused: Mapping[uuid.UUID, str] | None = None,
        now: datetime | None = None,
        *,
        live_for_s: float = DEFAULT_LIVE_FOR_S,
    ) -> dict[uuid.UUID, JobState]:
        """One transaction for jobs a worker received: insert the absent ones; mark running
        for `worker` (attempts + 1) those queued or orphaned (`storage.claims.orphaned`: a
        worker silent for `live_for_s`, stopped or started again); those in `refused` fail
        with their error instead. A job running live, here or elsewhere, is left as it is. A
        message whose id is a stored job of other content (another tenant's, say) never
        changes that row: compare with `JobState.is_job_of`. Times are the database's
        (`now` overrides it: tests). Maps each message job id to its canonical job's state
        (for a repeated id, the first message's)."""
        refused = refused or {}
        unique: dict[uuid.UUID, NewJob] = {}
        for job in jobs:
            unique.setdefault(job.id, job)
        if not unique:
            return {}
        insert = self.insert(J).on_conflict_do_nothing().returning(J.c.id)
        with self.writer.begin() as conn:
            now = now or db_now(conn)
            inserted = set(conn.scalars(insert, [j.row() for j in unique.values()]))
            canonical = {i: i for i in inserted}
            canonical.update(
                self._existing(conn, [j for i, j in unique.items() if i not in inserted])
            )
            contents = {i: unique[i].content() for i in inserted}
            existing = [i for i, c in canonical.items() if i == c and i not in inserted]
            contents.update(stored_contents(conn, existing))
            mine = [i for i, c in contents.items() if same_content(c, unique[i].content())]
            take(conn, [i for i in mine if i not in refused], worker, now, live_for_s)
            errors = {i: e for i, e in refused.items() if i in mine}
            self._fail(conn, errors, final=True, where=takeable(now, live_for_s))
            accounting.settle(conn, mine)
            states = claim_states(conn, set(canonical.values()), contents)
        return {job_id: states[c] for job_id, c in canonical.items() if c in states}

    def release(self, job_ids: Sequence[uuid.UUID], worker: str) -> int:
        """`storage.claims.release` in one transaction; how many rows went back to queued."""
        with self.writer.begin() as conn:
            return release(conn, job_ids, worker, db_now(conn))

    def store_outcomes(
        self,
        ended: Sequence[EndedJob],
        batches: Sequence[BatchRecord] = (),
        failures: Mapping[uuid.UUID, str] | None = None,
        expired: Iterable[uuid.UUID] = (),
        *,
        worker_usage: Sequence[UsageDelta] = (),
        views: dict[uuid.UUID, JobView] | None = None,
    ) -> set[uuid.UUID]:
        """One transaction: batch rows (upserted whole), results of finished jobs, their
        status, final failures and expiries, every ended job's facts and costs (an ended job
        without a result: its compute only) and the worker's usage. Idempotent: a job that
        already has a result keeps it; a cancelled job stays cancelled. Returns the ids with
        a new result; `views`, when given, gets the finished, failed and expired jobs as this
        transaction leaves them (read in it: the rows its commit makes)."""
        batch_rows = [dataclasses.asdict(b) for b in batches]
        results = list({e.job_id: e for e in ended if e.with_result}.values())
        charges = [e for e in ended if not e.with_result]
        expired = list(expired)
        new: set[uuid.UUID] = set()
        with self.writer.begin() as conn:
            statements = _outcome_statements(conn.dialect.name)
            if batch_rows:
                conn.execute(statements.batches, batch_rows)
            if results:
                rows = [e.result() for e in results]
                new = set(conn.scalars(statements.results, rows))
            fresh = [e for e in results if e.job_id in new]
            if fresh:
                done = [
                    {"p_id": e.job_id, "p_at": e.finished_at, "p_batch": e.batch_id} for e in fresh
                ]
                conn.execute(statements.done, done)
            self._fail(conn, failures or {}, final=True)
            self._fail(conn, dict.fromkeys(expired, EXPIRED_ERROR), final=True, expire=True)
            usage = fresh + charges
            accounting.settle(conn, [u.job_id for u in usage] + list(failures or {}) + expired)
            accounting.record_usage(conn, usage)
            accounting.add_worker_usage(conn, worker_usage)
            if views is not None:
                ids = [*(e.job_id for e in results), *(failures or {}), *expired]
                views.update(read_views(conn, ids))
        return new

    def fail_jobs(self, errors: Mapping[uuid.UUID, str], *, final: bool = True) -> None:
        """Final: mark failed with the error. Not final: requeue, keeping the error.

        Done and cancelled jobs are never touched; a non-final failure leaves failed jobs be.
        """
        if errors:
            with self.writer.begin() as conn:
                self._fail(conn, errors, final=final)
                accounting.settle(conn, errors)

    @staticmethod
    def _fail(
        conn: sa.Connection,
        errors: Mapping[uuid.UUID, str],
        *,
        final: bool,
        expire: bool = False,
        where: sa.ColumnElement[bool] | None = None,
    ) -> None:
        if not errors:
            return
        allowed = (*ACTIVE_STATUSES, "failed") if final and not expire else ACTIVE_STATUSES
        values: dict[str, Any] = {"error": sa.bindparam("p_error")}
        ended = JobStatus.EXPIRED if expire else JobStatus.FAILED
        values.update({"status": ended, "finished_at": utcnow()} if final else {"status": "queued"})
        stmt = (
            sa.update(J)
            .where(
                J.c.id == sa.bindparam("p_id"),
                _status_in(allowed),
                sa.true() if where is None else where,
            )
            .values(values)
        )
        conn.execute(stmt, [{"p_id": i, "p_error": e} for i, e in errors.items()])

    # -- reads ---------------------------------------------------------------------------

    def get(self, job_id: uuid.UUID, tenant: str | None = None) -> JobView | None:
        """One job (of `tenant`, when given) with its result and metrics, or None."""
        return self.get_many([job_id], tenant).get(job_id)

    def get_many(
        self, ids: Iterable[uuid.UUID], tenant: str | None = None
    ) -> dict[uuid.UUID, JobView]:
        """The jobs among `ids` that exist (and belong to `tenant`, when given), by id."""
        where = None if tenant is None else _of(tenant)
        with self.engine.connect() as conn:
            return read_views(conn, ids, where)

    def wait_ended(
        self, ids: Sequence[uuid.UUID], timeout: float, poll: float = 0.5
    ) -> list[JobView]:
        """Poll until every job among `ids` has ended (operators and the embedded demo:
        producers wait on Redis, see `api_client`); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            views = self.get_many(ids)
            if all(i in views and views[i].status in TERMINAL_STATUSES for i in ids):
                return [views[i] for i in ids]
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not finished after {timeout}s")
            time.sleep(poll)

    def statuses(self, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, str]:
        """Status of each existing job among `ids`."""
        ids = list(dict.fromkeys(ids))
        out: dict[uuid.UUID, str] = {}
        with self.engine.connect() as conn:
            for part in chunks(ids):
                rows = conn.execute(sa.select(J.c.id, J.c.status).where(J.c.id.in_(part)))
                out.update((i, s) for i, s in rows)
        return out

    def summary(self, job_ids: Sequence[uuid.UUID] | None = None) -> dict[str, Any]:
        """Aggregate figures over `job_ids` (None: every job); see `storage.summary`."""
        return summarize(self.engine, job_ids)
