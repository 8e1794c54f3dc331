"""Report queries over the reporting schema (migration 0004), returned as plain rows.

Each report reads a base table by a half-open time range ``[since, until)`` on a timestamp
column (``job_metrics.finished_at``, which is indexed alone and after ``tenant`` and
``model``; ``worker_usage.hour``; ``dead_letters.received_at``) and groups by its UTC day or
hour, spelled as in the report views: a day of `usage` equals the `usage_daily` row, an hour
of `engine_efficiency` the `engine_hourly` row, an hour of `latency` the `latency_hourly` row.
Percentiles are `percentile_cont` on PostgreSQL; SQLite has no percentile aggregate, so there
they are computed here with the same interpolation (`percentile_cont` below).

Rows are dicts: days are `date`, hours tz-aware UTC `datetime`, money `Decimal`, ratios
`float` (None where the divisor is zero), job ids `UUID`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa

from storage.models import (
    UTCDateTime,
    dead_letters_table,
    job_metrics_table,
    jobs_table,
    worker_usage_table,
)
from storage.records import USAGE_COUNTS, USAGE_SECONDS

Row = dict[str, Any]
Bucket = Literal["day", "hour"]
Statement = sa.Select[Any] | sa.CompoundSelect
J, M, W, D = jobs_table, job_metrics_table, worker_usage_table, dead_letters_table
BUCKETS: tuple[str, ...] = ("day", "hour")
STATUSES = ("done", "failed", "cancelled", "expired")
TOKENS = ("prompt_tokens", "cached_prompt_tokens", "computed_prompt_tokens", "completion_tokens")
MONEY = ("list_cost", "compute_cost", "cache_savings")
LATENCIES = ("queue_wait_s", "ttft_s", "total_s", "decode_tokens_per_s")
QUANTILES = (50, 95, 99)
ENGINE_SECONDS, ENGINE_COUNTS = USAGE_SECONDS, USAGE_COUNTS
JOB_REPORT_COLUMNS = (  # the job_report view's, in its order
    "job_id",
    "tenant",
    "model",
    "status",
    "priority",
    "attempts",
    "worker",
    "device",
    "error",
    "queued_at",
    "enqueued_at",
    "first_seen_at",
    "admitted_at",
    "first_token_at",
    "finished_at",
    "queue_wait_s",
    "ttft_s",
    "ttft_from_admission_s",
    "decode_s",
    "total_s",
    "decode_tokens_per_s",
    *TOKENS,
    "compute_s",
    "price_id",
    "rate_id",
    *MONEY,
)


def _report_type(name: str) -> Any:
    """The type of a `job_report` column: that of the jobs or job_metrics column it shows."""
    if name == "job_id":
        return J.c.id.type
    if name == "ttft_from_admission_s":
        return M.c.prefill_s.type
    return (M.c[name] if name in M.c else J.c[name]).type


_VIEW = sa.table("job_report", *(sa.column(n, _report_type(n)) for n in JOB_REPORT_COLUMNS))


def _lit(sql: str) -> sa.ColumnElement[Any]:
    """A constant written into the SQL: a GROUP BY must repeat its SELECT expression
    verbatim, which bound parameters (numbered apart) would not."""
    return sa.literal_column(sql)


def bucket(dialect: str, column: sa.ColumnElement[Any], by: str) -> sa.ColumnElement[Any]:
    """The UTC day (a date) or hour (a UTC datetime) of a timestamp, as the views spell it."""
    if by not in BUCKETS:
        raise ValueError(f"by must be one of {BUCKETS}, not {by!r}")
    if dialect == "postgresql":
        utc = sa.func.timezone(_lit("'UTC'"), column)  # = column AT TIME ZONE 'UTC'
        if by == "day":
            return sa.cast(utc, sa.Date)
        return sa.type_coerce(sa.func.date_trunc(_lit("'hour'"), utc), UTCDateTime())
    if by == "day":
        return sa.type_coerce(sa.func.date(column), sa.Date)
    return sa.type_coerce(sa.func.strftime(_lit("'%Y-%m-%d %H:00:00'"), column), UTCDateTime())


def failure_reason(dialect: str, error: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """An error's text before its first colon, at most 80 characters ('' for none)."""
    text = sa.func.coalesce(error, _lit("''"))
    if dialect == "postgresql":
        return sa.func.left(sa.func.split_part(text, _lit("':'"), _lit("1")), _lit("80"))
    cut = sa.func.instr(text.op("||")(_lit("':'")), _lit("':'")) - _lit("1")
    return sa.func.substr(text, _lit("1"), sa.func.min(cut, _lit("80")))


def percentile_cont(values: Sequence[float], fraction: float) -> float | None:
    """PostgreSQL's `percentile_cont(fraction)` over sorted, non-NULL `values`: linear
    interpolation between the closest ranks, in the same float arithmetic."""
    if not values:
        return None
    position = fraction * (len(values) - 1)
    low, high = math.floor(position), math.ceil(position)
    if low == high:
        return values[low]
    return values[low] + (position - low) * (values[high] - values[low])


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _in_window(column: sa.ColumnElement[Any], since: datetime, until: datetime) -> list[Any]:
    return [column >= since, column < until]


def _equal(pairs: dict[sa.ColumnElement[Any], str | None]) -> list[Any]:
    """Equality filters for the values given (None: no filter)."""
    return [column == value for column, value in pairs.items() if value is not None]


def _rows(engine: sa.Engine, statement: Statement) -> list[Row]:
    """Run a report. On PostgreSQL each run is planned for its own window: a reused prepared
    statement's generic plan misjudges the day buckets (measured: 0.5 s -> 1.1-1.5 s)."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan")
        return [dict(row) for row in conn.execute(statement).mappings()]


# -- statements ----------------------------------------------------------------------------


def usage_statement(
    dialect: str,
    since: datetime,
    until: datetime,
    tenant: str | None = None,
    model: str | None = None,
    by: str = "day",
) -> sa.Select[Any]:
    """Jobs, counts by status, tokens, compute seconds and money per bucket, tenant, model."""
    day = bucket(dialect, M.c.finished_at, by)
    one, zero = _lit("1"), _lit("0")
    counts = [
        sa.func.sum(sa.case((M.c.status == _lit(f"'{s}'"), one), else_=zero)).label(s)
        for s in STATUSES
    ]
    return (
        sa.select(
            day.label(by),
            M.c.tenant,
            M.c.model,
            sa.func.count().label("jobs"),
            *counts,
            *(sa.cast(sa.func.sum(M.c[n]), sa.BigInteger).label(n) for n in TOKENS),
            sa.func.sum(M.c.compute_s).label("compute_s"),
            *(sa.func.sum(M.c[n]).label(n) for n in MONEY),
        )
        .where(*_in_window(M.c.finished_at, since, until))
        .where(*_equal({M.c.tenant: tenant, M.c.model: model}))
        .group_by(day, M.c.tenant, M.c.model)
        .order_by(day, M.c.tenant, M.c.model)
    )


def latency_statement(
    dialect: str, since: datetime, until: datetime, model: str | None = None, by: str = "day"
) -> sa.Select[Any]:
    """PostgreSQL: done jobs and their latency percentiles per bucket and model. SQLite:
    the done jobs' bucket, model and latencies (`latency` groups and sorts them)."""
    day = bucket(dialect, M.c.finished_at, by)
    where = [M.c.status == "done", *_in_window(M.c.finished_at, since, until)]
    where += _equal({M.c.model: model})
    if dialect != "postgresql":
        columns = (M.c[n] for n in LATENCIES)
        return sa.select(day.label(by), M.c.model, *columns).where(*where)
    cuts = [
        sa.type_coerce(
            sa.func.percentile_cont(_lit(str(q / 100))).within_group(M.c[n]), sa.Float()
        ).label(f"{n}_p{q}")
        for n in LATENCIES
        for q in QUANTILES
    ]
    return (
        sa.select(day.label(by), M.c.model, sa.func.count().label("jobs"), *cuts)
        .where(*where)
        .group_by(day, M.c.model)
        .order_by(day, M.c.model)
    )


def engine_statement(
    dialect: str,
    since: datetime,
    until: datetime,
    worker: str | None = None,
    model: str | None = None,
    by: str = "hour",
) -> sa.Select[Any]:
    """Engine seconds and counters per bucket, worker and model (ratios: `engine_efficiency`)."""
    hour = W.c.hour if by == "hour" else bucket(dialect, W.c.hour, by)
    return (
        sa.select(
            hour.label(by),
            W.c.worker,
            W.c.model,
            sa.func.max(W.c.device).label("device"),
            *(sa.func.sum(W.c[n]).label(n) for n in ENGINE_SECONDS),
            *(sa.cast(sa.func.sum(W.c[n]), sa.BigInteger).label(n) for n in ENGINE_COUNTS),
        )
        .where(*_in_window(W.c.hour, since, until))
        .where(*_equal({W.c.worker: worker, W.c.model: model}))
        .group_by(hour, W.c.worker, W.c.model)
        .order_by(hour, W.c.worker, W.c.model)
    )


def failures_statement(
    dialect: str, since: datetime, until: datetime, by: str = "day"
) -> sa.CompoundSelect:
    """Dead letters by reason, and failed or expired jobs by error reason, per bucket."""
    dead_day, job_day = bucket(dialect, D.c.received_at, by), bucket(dialect, M.c.finished_at, by)
    reason = failure_reason(dialect, J.c.error)
    dead = (
        sa.select(
            dead_day.label(by),
            _lit("'dead_letter'").label("kind"),
            D.c.reason,
            sa.func.count().label("count"),
        )
        .where(*_in_window(D.c.received_at, since, until))
        .group_by(dead_day, D.c.reason)
    )
    jobs = (
        sa.select(
            job_day.label(by),
            M.c.status.label("kind"),
            reason.label("reason"),
            sa.func.count().label("count"),
        )
        .select_from(M.join(J, J.c.id == M.c.job_id))
        .where(M.c.status.in_(("failed", "expired")), *_in_window(M.c.finished_at, since, until))
        .group_by(job_day, M.c.status, reason)
    )
    return sa.union_all(dead, jobs).order_by(*(_lit(n) for n in (by, "kind", "reason")))


def jobs_statement(
    dialect: str,
    since: datetime,
    until: datetime,
    tenant: str | None = None,
    model: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> sa.Select[Any]:
    """The `job_report` rows of the latest `limit` jobs that ended in the window."""
    latest = (
        sa.select(M.c.job_id)
        .where(*_in_window(M.c.finished_at, since, until))
        .where(*_equal({M.c.tenant: tenant, M.c.model: model, M.c.status: status}))
        .order_by(M.c.finished_at.desc())
        .limit(limit)
    )
    return (
        sa.select(_VIEW)
        .where(_VIEW.c.job_id.in_(latest))
        .order_by(_VIEW.c.finished_at.desc(), _VIEW.c.job_id)
    )


STATEMENTS: dict[str, Callable[..., Statement]] = {
    "usage": usage_statement,
    "latency": latency_statement,
    "engine": engine_statement,
    "failures": failures_statement,
    "jobs": jobs_statement,
}


def render_sql(engine: sa.Engine, statement: Statement) -> str:
    """The statement as this engine's dialect runs it, parameters written in (for EXPLAIN)."""
    compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
    return str(compiled)


# -- reports -------------------------------------------------------------------------------


def usage(
    engine: sa.Engine,
    since: datetime,
    until: datetime,
    tenant: str | None = None,
    model: str | None = None,
    by: str = "day",
) -> list[Row]:
    """Per day (or hour), tenant and model: jobs, done/failed/cancelled/expired, token sums,
    compute seconds, list cost, compute cost and cache savings."""
    return _rows(engine, usage_statement(engine.dialect.name, since, until, tenant, model, by))


def latency(
    engine: sa.Engine,
    since: datetime,
    until: datetime,
    model: str | None = None,
    by: str = "day",
) -> list[Row]:
    """Per day (or hour) and model, over done jobs: `jobs` and the p50/p95/p99 of queue
    wait, TTFT, total time and decode tokens/s (`<column>_p<q>`; NULLs ignored)."""
    dialect = engine.dialect.name
    statement = latency_statement(dialect, since, until, model, by)
    if dialect == "postgresql":
        return _rows(engine, statement)
    groups: dict[tuple[Any, Any], list[Any]] = {}
    with engine.connect() as conn:
        for job in conn.execute(statement):
            groups.setdefault(job[:2], []).append(job[2:])
    rows = []
    for day, name in sorted(groups, key=lambda k: (k[0], k[1] is None, k[1] or "")):
        jobs = groups[(day, name)]  # PostgreSQL's order: bucket, then model (NULL last)
        row: Row = {by: day, "model": name, "jobs": len(jobs)}
        for column_name, column in zip(LATENCIES, zip(*jobs, strict=True), strict=True):
            values = sorted(v for v in column if v is not None)
            for q in QUANTILES:
                row[f"{column_name}_p{q}"] = percentile_cont(values, q / 100)
        rows.append(row)
    return rows


def engine_efficiency(
    engine: sa.Engine,
    since: datetime,
    until: datetime,
    worker: str | None = None,
    model: str | None = None,
    by: str = "hour",
) -> list[Row]:
    """Per hour (or day), worker and model: engine seconds and counters, and the ratios of
    `engine_hourly` (busy share, output tokens/s, computed tokens per busy second, mean
    running sequences per step, prefix-cache hit rate)."""
    statement = engine_statement(engine.dialect.name, since, until, worker, model, by)
    rows = _rows(engine, statement)
    for r in rows:
        wall = r["busy_s"] + r["idle_s"]
        r.update(
            busy_share=_ratio(r["busy_s"], wall),
            output_tokens_per_s=_ratio(r["seq_steps"], wall),
            computed_tokens_per_busy_s=_ratio(
                r["prefill_tokens"] + r["decode_tokens"], r["busy_s"]
            ),
            mean_running_seqs=_ratio(r["seq_steps"], r["steps"]),
            prefix_hit_rate=_ratio(r["cache_hit_tokens"], r["cache_queried_tokens"]),
        )
    return rows


def failures(engine: sa.Engine, since: datetime, until: datetime, by: str = "day") -> list[Row]:
    """Per day (or hour): dead letters by reason, and failed and expired jobs by the text of
    their error before its first colon (`kind` is dead_letter, failed or expired)."""
    return _rows(engine, failures_statement(engine.dialect.name, since, until, by))


def jobs(
    engine: sa.Engine,
    since: datetime,
    until: datetime,
    tenant: str | None = None,
    model: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[Row]:
    """The latest `limit` jobs that ended in the window, newest first, from `job_report`."""
    statement = jobs_statement(engine.dialect.name, since, until, tenant, model, status, limit)
    return _rows(engine, statement)
