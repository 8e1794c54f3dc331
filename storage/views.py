"""Jobs read as `JobView`s (the job row, its result and its metrics), on a connection the
caller holds: `Repository.get_many` opens its own; the claim and the result sink read the
rows they are about to commit inside their own transaction, so the result publisher writes
what was committed without reading the database again."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable

import sqlalchemy as sa

from storage.db import IDS, chunks, ids_in
from storage.models import job_metrics_table, jobs_table, results_table
from storage.records import JobView, MetricsRow, ResultRow

J, R, M = jobs_table, results_table, job_metrics_table
JOB_FIELDS = [f.name for f in dataclasses.fields(JobView) if f.name not in ("result", "metrics")]
_RESULT_FIELDS = [f.name for f in dataclasses.fields(ResultRow) if f.name != "job_id"]
_METRIC_FIELDS = [f.name for f in dataclasses.fields(MetricsRow) if f.name != "job_id"]
_COLUMNS = [
    *(J.c[name] for name in JOB_FIELDS),
    R.c.job_id.label("r_job_id"),
    *(R.c[name] for name in _RESULT_FIELDS),
    M.c.job_id.label("m_job_id"),
    *(M.c[name] for name in _METRIC_FIELDS),
]
_JOINED = J.outerjoin(R, R.c.job_id == J.c.id).outerjoin(M, M.c.job_id == J.c.id)
_VIEWS = sa.select(*_COLUMNS).select_from(_JOINED).where(ids_in(J.c.id))  # built once


def read_views(
    conn: sa.Connection, ids: Iterable[uuid.UUID], where: sa.ColumnElement[bool] | None = None
) -> dict[uuid.UUID, JobView]:
    """The jobs among `ids` that exist (and match `where`), by id, as `conn` sees them (in a
    transaction: with its own uncommitted writes)."""
    out: dict[uuid.UUID, JobView] = {}
    stmt = _VIEWS if where is None else _VIEWS.where(where)
    for part in chunks(list(dict.fromkeys(ids))):
        for row in conn.execute(stmt, {IDS: part}).mappings():
            view = JobView(**{name: row[name] for name in JOB_FIELDS})
            if row["r_job_id"] is not None:
                view.result = ResultRow(view.id, **{n: row[n] for n in _RESULT_FIELDS})
            if row["m_job_id"] is not None:
                view.metrics = MetricsRow(view.id, **{n: row[n] for n in _METRIC_FIELDS})
            out[view.id] = view
    return out
