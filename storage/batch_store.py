"""The gateway's files and batches in the database (`storage.gateway_models`): an uploaded
file's lines go in and out in chunks (a 50,000-line file is never held whole), a batch's
request lines name their jobs, and its counts and output come from those jobs' records."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.db import db_now, make_engine
from storage.gateway_models import (
    api_batch_requests_table,
    api_batches_table,
    file_lines_table,
    files_table,
)
from storage.models import UTCDateTime, jobs_table, results_table

F, L, B, R = files_table, file_lines_table, api_batches_table, api_batch_requests_table
J, RES = jobs_table, results_table
CHUNK = 1000  # lines per insert or read
FAILED_JOBS = ("failed", "expired", "cancelled")
RUNNING = ("validating", "in_progress", "cancelling", "finalizing")  # batches not ended


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    completed: int
    failed: int
    unsent: int = 0  # lines whose job was never enqueued (still pending)

    @property
    def pending(self) -> int:
        return self.total - self.completed - self.failed

    @property
    def running(self) -> int:
        """Jobs enqueued and not ended."""
        return self.pending - self.unsent


@dataclass(frozen=True, slots=True)
class OutputLine:
    """One request line and what became of it."""

    line_no: int
    custom_id: str
    job_id: uuid.UUID | None
    refused: str | None  # why the line never became a job
    status: str | None  # the job's (None: not taken by a worker yet)
    error: str | None
    model: str | None
    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    finished_at: datetime | None


class BatchStore:
    def __init__(self, url_or_engine: str | sa.Engine) -> None:
        is_url = isinstance(url_or_engine, str)
        self.engine = make_engine(url_or_engine) if is_url else url_or_engine

    # -- files --
    def create_file(
        self, tenant: str, purpose: str, filename: str, lines: Iterable[str]
    ) -> dict[str, Any]:
        """Store an uploaded file's lines (blank ones dropped), `CHUNK` at a time."""
        file_id, size, n = uuid.uuid4(), 0, 0
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(F).values(id=file_id, tenant=tenant, purpose=purpose, filename=filename)
            )
            chunk: list[dict[str, Any]] = []
            for line in lines:
                size += len(line.encode())
                if not line.strip():
                    continue
                n += 1
                chunk.append({"file_id": file_id, "line_no": n, "body": line.rstrip("\r\n")})
                if len(chunk) == CHUNK:
                    conn.execute(sa.insert(L), chunk)
                    chunk = []
            if chunk:
                conn.execute(sa.insert(L), chunk)
            conn.execute(sa.update(F).where(F.c.id == file_id).values(bytes=size, lines=n))
        found = self.file(tenant, file_id)
        assert found is not None
        return found

    def output_file(self, batch_id: uuid.UUID, tenant: str, kind: str) -> uuid.UUID:
        """A batch's output or error file: a row only (its lines are the jobs' records)."""
        file_id = uuid.uuid4()
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(F).values(
                    id=file_id,
                    tenant=tenant,
                    purpose="batch_output",
                    batch_id=batch_id,
                    kind=kind,
                    filename=f"batch_{batch_id.hex}_{kind}.jsonl",
                )
            )
        return file_id

    def file(self, tenant: str, file_id: uuid.UUID) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(F).where(F.c.id == file_id, F.c.tenant == tenant)).first()
        return dict(row._mapping) if row else None

    def files(
        self,
        tenant: str,
        *,
        limit: int,
        newest_first: bool,
        after: uuid.UUID | None = None,
        purpose: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` of the tenant's files by creation time (ties by id), those past the
        file `after` in that order (none if it is not the tenant's); and whether more follow."""
        order = sa.tuple_(F.c.created_at, F.c.id)
        query = sa.select(F).where(F.c.tenant == tenant)
        if purpose is not None:
            query = query.where(F.c.purpose == purpose)
        if after is not None:
            mark = self.file(tenant, after)
            if mark is None:
                return [], False
            at = sa.literal(mark["created_at"], UTCDateTime)
            past = sa.tuple_(at, sa.literal(after, sa.Uuid))
            query = query.where(order < past if newest_first else order > past)
        columns = (F.c.created_at, F.c.id)
        query = query.order_by(*(c.desc() for c in columns) if newest_first else columns)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query.limit(limit + 1))]
        return rows[:limit], len(rows) > limit

    def file_in_use(self, file_id: uuid.UUID) -> bool:
        """Whether a batch that has not ended reads this file (its input)."""
        query = sa.select(B.c.id).where(B.c.input_file_id == file_id, B.c.status.in_(RUNNING))
        with self.engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def delete_file(self, tenant: str, file_id: uuid.UUID) -> bool:
        """Delete one of the tenant's files (its lines with it); False: no such file."""
        with self.engine.begin() as conn:
            gone = conn.execute(
                sa.delete(F).where(F.c.id == file_id, F.c.tenant == tenant).returning(F.c.id)
            ).first()
        return gone is not None

    def lines(self, file_id: uuid.UUID, after: int = 0) -> Iterator[list[tuple[int, str]]]:
        """The file's lines past line `after` in chunks, by line number (keyset: each chunk
        one short query)."""
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(L.c.line_no, L.c.body)
                    .where(L.c.file_id == file_id, L.c.line_no > after)
                    .order_by(L.c.line_no)
                    .limit(CHUNK)
                ).all()
            if not rows:
                return
            after = rows[-1].line_no
            yield [(r.line_no, r.body) for r in rows]

    # -- batches --
    def create_batch(self, **values: Any) -> uuid.UUID:
        batch_id = uuid.uuid4()
        with self.engine.begin() as conn:
            conn.execute(sa.insert(B).values(id=batch_id, status="validating", **values))
        return batch_id

    def batch(self, tenant: str, batch_id: uuid.UUID) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(B).where(B.c.id == batch_id, B.c.tenant == tenant)).first()
        return dict(row._mapping) if row else None

    def batch_row(self, batch_id: uuid.UUID) -> dict[str, Any]:
        """A batch whoever its tenant (for its driver)."""
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(B).where(B.c.id == batch_id)).one()._mapping)

    def batches(self, tenant: str, limit: int) -> list[dict[str, Any]]:
        query = sa.select(B).where(B.c.tenant == tenant).order_by(B.c.created_at.desc())
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query.limit(limit))]

    def move(self, batch_id: uuid.UUID, from_: Iterable[str], to: str, **values: Any) -> bool:
        """Set the batch's status (and `<status>_at` to the database's clock) if it is in one
        of `from_`: one replica wins a race, the others see False."""
        with self.engine.begin() as conn:
            stamp = {f"{to}_at": db_now(conn)} if f"{to}_at" in B.c else {}
            moved = conn.execute(
                sa.update(B)
                .where(B.c.id == batch_id, B.c.status.in_(list(from_)))
                .values(status=to, **stamp, **values)
                .returning(B.c.id)
            ).first()
        return moved is not None

    def counts(self, batch_id: uuid.UUID) -> Counts:
        done = sa.func.count().filter(J.c.status == "done")
        failed = sa.func.count().filter(sa.or_(R.c.job_id.is_(None), J.c.status.in_(FAILED_JOBS)))
        unsent = sa.func.count().filter(R.c.job_id.is_not(None), R.c.sent_at.is_(None))
        query = (
            sa.select(sa.func.count(), done, failed, unsent)
            .select_from(R.outerjoin(J, J.c.id == R.c.job_id))
            .where(R.c.batch_id == batch_id)
        )
        with self.engine.connect() as conn:
            total, completed, failures, unsent_ = conn.execute(query).one()
        return Counts(total, completed, failures, unsent_)

    def unended_jobs(self, batch_id: uuid.UUID) -> list[uuid.UUID]:
        """Jobs of the batch enqueued and not ended yet (queued ones have no row yet)."""
        query = (
            sa.select(R.c.job_id)
            .select_from(R.outerjoin(J, J.c.id == R.c.job_id))
            .where(R.c.batch_id == batch_id, R.c.job_id.is_not(None), R.c.sent_at.is_not(None))
            .where(sa.or_(J.c.id.is_(None), J.c.status.in_(["queued", "running"])))
        )
        with self.engine.connect() as conn:
            return list(conn.scalars(query))

    def outputs(self, batch_id: uuid.UUID) -> Iterator[list[OutputLine]]:
        """Every request line with its job's outcome, in chunks by line number."""
        columns = [
            R.c.line_no,
            R.c.custom_id,
            R.c.job_id,
            R.c.error.label("refused"),
            J.c.status,
            J.c.error,
            J.c.model,
            RES.c.text,
            RES.c.finish_reason,
            RES.c.prompt_tokens,
            RES.c.completion_tokens,
            RES.c.cached_tokens,
            J.c.finished_at,
        ]
        joined = R.outerjoin(J, J.c.id == R.c.job_id).outerjoin(RES, RES.c.job_id == R.c.job_id)
        after = 0
        while True:
            query = (
                sa.select(*columns)
                .select_from(joined)
                .where(R.c.batch_id == batch_id, R.c.line_no > after)
                .order_by(R.c.line_no)
                .limit(CHUNK)
            )
            with self.engine.connect() as conn:
                rows = [OutputLine(*row) for row in conn.execute(query)]
            if not rows:
                return
            after = rows[-1].line_no
            yield rows
