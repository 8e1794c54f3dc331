"""The reports (storage.reports) on PostgreSQL and SQLite, over a hand-built dataset whose
figures are worked out by hand here (see report_data for what it holds)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from report_data import COMPUTE, DAY, FAILED_COMPUTE, HOUR, LIST, SAVINGS, Dataset, build

from storage import reports
from storage.db import make_engine


@pytest.fixture
def ds(db_url: str) -> Dataset:
    return build(db_url)


def _engine(ds: Dataset) -> sa.Engine:
    return make_engine(ds.url)


def _pick(rows: list[dict[str, Any]], *keys: str) -> list[tuple[Any, ...]]:
    return [tuple(r[k] for k in keys) for r in rows]


def test_usage_by_day_counts_sums_and_costs(ds: Dataset) -> None:
    rows = reports.usage(_engine(ds), ds.since, ds.until)
    mine = [r for r in rows if r["tenant"] in (ds.a, ds.b)]
    assert mine == rows  # nothing else in this window
    day0, day1 = ds.base.date(), (ds.base + DAY).date()
    assert _pick(
        rows, "day", "tenant", "model", "jobs", "done", "failed", "cancelled", "expired"
    ) == [
        (day0, ds.a, ds.x, 10, 6, 2, 1, 1),
        (day0, ds.a, ds.y, 2, 2, 0, 0, 0),
        (day1, ds.b, ds.x, 13, 11, 2, 0, 0),
    ]
    tokens = (
        "prompt_tokens",
        "cached_prompt_tokens",
        "computed_prompt_tokens",
        "completion_tokens",
        "compute_s",
    )
    assert _pick(rows, *tokens) == [
        (60_000, 24_000, 36_000, 12_000, 6 * 12.5 + 3 * 5.0),
        (20_000, 8_000, 12_000, 4_000, 25.0),
        (110_000, 44_000, 66_000, 22_000, 11 * 12.5 + 2 * 5.0),
    ]
    money = _pick(rows, "list_cost", "compute_cost", "cache_savings")
    assert money == [
        (6 * LIST, 6 * COMPUTE + 3 * FAILED_COMPUTE, 6 * SAVINGS),
        (None, 2 * COMPUTE, None),  # model y has no price
        (11 * LIST, 11 * COMPUTE + 2 * FAILED_COMPUTE, 11 * SAVINGS),
    ]
    assert money[0] == (Decimal("0.306"), Decimal("0.072"), Decimal("0.054"))  # to the cent
    assert all(isinstance(v, Decimal) for row in money for v in row if v is not None)

    only_b = reports.usage(_engine(ds), ds.since, ds.until, tenant=ds.b)
    assert _pick(only_b, "tenant", "jobs") == [(ds.b, 13)]
    only_y = reports.usage(_engine(ds), ds.since, ds.until, model=ds.y)
    assert _pick(only_y, "model", "jobs") == [(ds.y, 2)]


def test_usage_by_day_matches_the_usage_daily_view(ds: Dataset) -> None:
    columns = (
        "tenant",
        "model",
        "jobs",
        "done",
        "failed",
        "cancelled",
        "expired",
        "prompt_tokens",
        "completion_tokens",
    )
    view = sa.table("usage_daily", *(sa.column(c) for c in ("day", *columns)))
    with _engine(ds).connect() as conn:
        rows = conn.execute(
            sa.select(view).where(view.c.tenant.in_([ds.a, ds.b])).order_by(*view.c)
        ).mappings()
        days = (str(ds.base.date()), str((ds.base + DAY).date()))
        in_window = [r for r in rows if str(r["day"]) in days]
    expected = [(str(r["day"]), *(r[c] for c in columns)) for r in in_window]
    mine = reports.usage(_engine(ds), ds.since, ds.until)
    assert [(str(r["day"]), *(r[c] for c in columns)) for r in mine] == expected


def test_usage_by_hour(ds: Dataset) -> None:
    rows = reports.usage(_engine(ds), ds.since, ds.until, tenant=ds.a, by="hour")
    assert _pick(rows, "hour", "model", "jobs", "done", "failed", "cancelled", "expired") == [
        (ds.base + 10 * HOUR, ds.x, 3, 3, 0, 0, 0),
        (ds.base + 11 * HOUR, ds.x, 3, 3, 0, 0, 0),
        (ds.base + 12 * HOUR, ds.x, 4, 0, 2, 1, 1),
        (ds.base + 13 * HOUR, ds.y, 2, 2, 0, 0, 0),
    ]
    assert rows[0]["list_cost"] == 3 * LIST and rows[2]["list_cost"] is None
    assert rows[2]["compute_cost"] == 3 * FAILED_COMPUTE
    assert rows[0]["hour"].utcoffset() == timedelta(0)


def _latency(row: dict[str, Any], column: str) -> list[float | None]:
    return [row[f"{column}_p{q}"] for q in (50, 95, 99)]


def test_latency_percentiles_by_day(ds: Dataset) -> None:
    rows = reports.latency(_engine(ds), ds.since, ds.until)
    day0, day1 = ds.base.date(), (ds.base + DAY).date()
    assert _pick(rows, "day", "model", "jobs") == [
        (day0, ds.x, 6),
        (day0, ds.y, 2),
        (day1, ds.x, 11),
    ]
    a_x, a_y, b_x = rows
    # five values (the sixth job has none): position q * 4 between the closest ranks
    assert _latency(a_x, "ttft_s") == pytest.approx([0.3, 0.4 + 0.8 * 0.6, 0.4 + 0.96 * 0.6])
    assert _latency(a_x, "total_s") == pytest.approx([3.0, 4 + 0.8 * 6, 4 + 0.96 * 6])
    assert _latency(a_x, "queue_wait_s") == pytest.approx([0.03, 0.088, 0.0976])
    assert _latency(a_x, "decode_tokens_per_s") == pytest.approx([30.0, 88.0, 97.6])
    assert _latency(a_y, "ttft_s") == pytest.approx([1.0, 1.45, 1.49])
    # eleven values 1..11: position q * 10
    assert _latency(b_x, "ttft_s") == pytest.approx([6.0, 10.5, 10.9])
    assert _latency(b_x, "total_s") == pytest.approx([12.0, 21.0, 21.8])
    assert _latency(b_x, "decode_tokens_per_s") == pytest.approx([60.0, 105.0, 109.0])

    only_y = reports.latency(_engine(ds), ds.since, ds.until, model=ds.y)
    assert _pick(only_y, "model", "jobs", "ttft_s_p50") == [(ds.y, 2, pytest.approx(1.0))]


def test_latency_percentiles_by_hour(ds: Dataset) -> None:
    rows = reports.latency(_engine(ds), ds.since, ds.until, model=ds.x, by="hour")
    assert _pick(rows, "hour", "jobs") == [
        (ds.base + 10 * HOUR, 3),
        (ds.base + 11 * HOUR, 3),
        (ds.base + DAY + 8 * HOUR, 11),
    ]
    assert _latency(rows[0], "ttft_s") == pytest.approx([0.2, 0.29, 0.298])
    assert _latency(rows[1], "ttft_s") == pytest.approx([0.7, 0.97, 0.994])  # NULL ignored
    assert _latency(rows[1], "queue_wait_s") == pytest.approx([0.07, 0.097, 0.0994])
    assert _latency(rows[2], "ttft_s") == pytest.approx([6.0, 10.5, 10.9])
    if make_engine(ds.url).dialect.name == "postgresql":  # the view gives the same numbers
        view = sa.table("latency_hourly", *(sa.column(c) for c in rows[0]))
        with _engine(ds).connect() as conn:
            since = ds.since.replace(tzinfo=None)  # the view's hour: timestamp, UTC
            stmt = sa.select(view).where(view.c.model == ds.x, view.c.hour >= since)
            stmt = stmt.order_by(view.c.hour)
            viewed = [dict(r) for r in conn.execute(stmt).mappings()]
        assert [{**r, "hour": r["hour"].replace(tzinfo=None)} for r in rows] == viewed


def test_engine_efficiency_by_hour_and_day(ds: Dataset) -> None:
    engine = _engine(ds)
    rows = [
        r
        for r in reports.engine_efficiency(engine, ds.since, ds.until)
        if r["worker"] in (ds.w1, ds.w2)
    ]
    ratios = (
        "busy_share",
        "output_tokens_per_s",
        "computed_tokens_per_busy_s",
        "mean_running_seqs",
        "prefix_hit_rate",
    )
    assert _pick(rows, "hour", "worker", "model", "device") == [
        (ds.base + 10 * HOUR, ds.w1, ds.x, "cpu"),
        (ds.base + 11 * HOUR, ds.w1, ds.x, "cpu"),
        (ds.base + DAY + 5 * HOUR, ds.w2, ds.y, "cpu"),
    ]
    assert _pick(rows, *ratios) == [
        (0.5, 4000 / 3600, 5.0, 4.0, 0.25),
        (0.25, 600 / 3600, 1600 / 900, 2.0, 1.0),
        (0.0, 0.0, None, None, None),  # idle all hour: nothing to divide by
    ]
    assert rows[0]["recompute_tokens"] == 100 and isinstance(rows[0]["steps"], int)
    view = sa.table("engine_hourly", *(sa.column(c) for c in ("worker", "hour", *ratios)))
    with engine.connect() as conn:
        stmt = sa.select(view).where(view.c.worker.in_([ds.w1, ds.w2])).order_by(view.c.hour)
        viewed = [tuple(r)[2:] for r in conn.execute(stmt)][:3]
    assert _pick(rows, *ratios) == viewed  # the same figures as the engine_hourly view

    days = reports.engine_efficiency(engine, ds.since, ds.until, worker=ds.w1, by="day")
    assert _pick(days, "day", "busy_s", "idle_s", "steps", *ratios) == [
        (ds.base.date(), 2700.0, 4500.0, 1300, 0.375, 4600 / 7200, 10600 / 2700, 4600 / 1300, 0.5),
    ]
    only_y = reports.engine_efficiency(engine, ds.since, ds.until, model=ds.y)
    assert _pick(only_y, "worker") == [(ds.w2,)]


def test_failures_by_reason_per_day(ds: Dataset) -> None:
    rows = reports.failures(_engine(ds), ds.since, ds.until)
    day0, day1 = ds.base.date(), (ds.base + DAY).date()
    assert _pick(rows, "day", "kind", "reason", "count") == [
        (day0, "dead_letter", "invalid job", 2),
        (day0, "expired", "deadline passed", 1),
        (day0, "failed", "CUDA OOM", 2),
        (day1, "dead_letter", "not json", 1),
        (day1, "failed", "boom", 1),
        (day1, "failed", "x" * 80, 1),  # no colon: the first 80 characters
    ]
    hours = reports.failures(_engine(ds), ds.since, ds.base + DAY, by="hour")
    assert _pick(hours, "hour", "kind", "count") == [
        (ds.base + HOUR, "dead_letter", 1),
        (ds.base + 2 * HOUR, "dead_letter", 1),
        (ds.base + 12 * HOUR, "expired", 1),
        (ds.base + 12 * HOUR, "failed", 2),
    ]


def test_jobs_from_job_report_newest_first(ds: Dataset) -> None:
    engine = _engine(ds)
    rows = reports.jobs(engine, ds.since, ds.until, tenant=ds.a, limit=3)
    a_jobs = sorted(
        (j for j in ds.jobs if j["tenant"] == ds.a and ds.since <= j["finished_at"] < ds.until),
        key=lambda j: j["finished_at"],
        reverse=True,
    )
    assert [r["job_id"] for r in rows] == [j["job_id"] for j in a_jobs[:3]]
    newest = rows[0]
    assert (newest["model"], newest["status"], newest["device"]) == (ds.y, "done", "cpu")
    assert newest["ttft_s"] == 1.5 and newest["ttft_from_admission_s"] == pytest.approx(1.35)
    assert newest["finished_at"] == a_jobs[0]["finished_at"]
    assert newest["compute_cost"] == COMPUTE and newest["list_cost"] is None
    assert newest["prompt_tokens"] == 10_000 and newest["error"] is None

    failed = reports.jobs(engine, ds.since, ds.until, model=ds.x, status="failed")
    assert [r["error"] for r in failed] == [
        "x" * 100,
        "boom",
        "CUDA OOM: step 3",
        "CUDA OOM: out of memory",
    ]
    assert (
        reports.jobs(engine, ds.since, ds.until, tenant=ds.a, limit=100)[-1]["job_id"]
        == (a_jobs[-1]["job_id"])
    )
    assert len(reports.jobs(engine, ds.since, ds.until, tenant=ds.a, limit=100)) == 12


def test_render_sql_writes_the_parameters_in(ds: Dataset) -> None:
    engine = _engine(ds)
    for name, build_statement in reports.STATEMENTS.items():
        sql = reports.render_sql(engine, build_statement(engine.dialect.name, ds.since, ds.until))
        assert "finished_at" in sql or "hour" in sql or "received_at" in sql, name
        assert ds.base.strftime("%Y-%m-%d") in sql
        with engine.connect() as conn:  # it runs as printed
            conn.exec_driver_sql(sql)
