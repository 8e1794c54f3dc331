"""Migration 0004 with data present, on PostgreSQL and SQLite: a job that ended at 0003 gets
its facts (tenant, model, status, tokens) backfilled into job_metrics; the downgrade to 0003
keeps its row and drops the rest cleanly; a second upgrade backfills it again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from storage import migrate, reports
from storage.db import build_engine
from storage.models import JSONType, UTCDateTime

FINISHED = datetime(2026, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC)
STARTED = FINISHED - timedelta(seconds=3)
VIEWS = {"job_report", "usage_daily", "engine_hourly", "failures_daily"}
NEW_TABLES = {"prices", "compute_rates", "worker_usage"}
# the tables as they are at revision 0003 (only the columns written here)
JOBS = sa.table(
    "jobs",
    sa.column("id", sa.Uuid()),
    sa.column("tenant", sa.String()),
    sa.column("model", sa.String()),
    sa.column("params", JSONType),
    sa.column("status", sa.String()),
    sa.column("queued_at", UTCDateTime()),
    sa.column("started_at", UTCDateTime()),
    sa.column("finished_at", UTCDateTime()),
    sa.column("attempts", sa.Integer()),
    sa.column("worker", sa.String()),
)
RESULTS = sa.table(
    "results",
    sa.column("job_id", sa.Uuid()),
    sa.column("text", sa.String()),
    sa.column("finish_reason", sa.String()),
    *(sa.column(n, sa.Integer()) for n in ("prompt_tokens", "completion_tokens", "cached_tokens")),
)
METRICS = sa.table(
    "job_metrics",
    sa.column("job_id", sa.Uuid()),
    *(sa.column(n, sa.Float()) for n in ("queue_wait_s", "ttft_s")),
)
FACTS = sa.table(
    "job_metrics",
    *(
        sa.column(n)
        for n in (
            "tenant",
            "model",
            "status",
            "worker",
            "attempts",
            "prompt_tokens",
            "cached_prompt_tokens",
            "computed_prompt_tokens",
            "completion_tokens",
            "spec_drafted_tokens",
            "spec_accepted_tokens",
            "compute_s",
            "list_cost",
            "queue_wait_s",
        )
    ),
    sa.column("job_id", sa.Uuid()),
    sa.column("finished_at", UTCDateTime()),
    sa.column("first_seen_at", UTCDateTime()),
)


def _columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def _facts(engine: sa.Engine, job_id: uuid.UUID) -> dict[str, object]:
    with engine.connect() as conn:
        (row,) = conn.execute(sa.select(FACTS).where(FACTS.c.job_id == job_id)).mappings()
    return dict(row)


def _assert_backfilled(engine: sa.Engine, done: uuid.UUID) -> None:
    facts = _facts(engine, done)
    assert facts["finished_at"] == FINISHED and facts["first_seen_at"] == STARTED
    del facts["finished_at"], facts["first_seen_at"], facts["job_id"]
    assert facts == {
        "tenant": "t-mig",
        "model": "m-mig",
        "status": "done",
        "worker": "w-mig",
        "attempts": 2,
        "prompt_tokens": 50,
        "cached_prompt_tokens": 20,
        "computed_prompt_tokens": 30,
        "completion_tokens": 7,
        "spec_drafted_tokens": 0,  # 0011's server default: rows from before it read 0
        "spec_accepted_tokens": 0,
        "compute_s": 0.0,
        "list_cost": None,
        "queue_wait_s": 0.25,
    }
    day = FINISHED.replace(hour=0, minute=0, second=0, microsecond=0)
    (usage,) = reports.usage(engine, day, day + timedelta(days=1))  # the reports read it
    assert (usage["tenant"], usage["jobs"], usage["done"], usage["prompt_tokens"]) == (
        "t-mig",
        1,
        1,
        50,
    )


def _report_statistics(engine: sa.Engine) -> int | None:
    """How many of migration 0005's planner statistics exist (None: not PostgreSQL)."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        return conn.scalar(
            sa.text("SELECT count(*) FROM pg_statistic_ext WHERE stxname = :n"),
            {"n": "st_job_metrics_usage_day"},
        )


def test_0004_backfills_downgrades_and_upgrades_again(
    empty_db_url: str,
) -> None:
    url = empty_db_url
    migrate.upgrade(url, "0003")
    engine = build_engine(url)
    done, queued = uuid.uuid4(), uuid.uuid4()
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(JOBS),
                [
                    {
                        "id": done,
                        "tenant": "t-mig",
                        "model": "m-mig",
                        "params": {},
                        "status": "done",
                        "queued_at": STARTED - timedelta(seconds=1),
                        "started_at": STARTED,
                        "finished_at": FINISHED,
                        "attempts": 2,
                        "worker": "w-mig",
                    },
                    {
                        "id": queued,
                        "tenant": "t-mig",
                        "model": "m-mig",
                        "params": {},
                        "status": "queued",
                        "queued_at": FINISHED,
                        "started_at": None,
                        "finished_at": None,
                        "attempts": 0,
                        "worker": None,
                    },
                ],
            )
            conn.execute(
                sa.insert(RESULTS).values(
                    job_id=done,
                    text="out",
                    finish_reason="length",
                    prompt_tokens=50,
                    completion_tokens=7,
                    cached_tokens=20,
                )
            )
            conn.execute(sa.insert(METRICS).values(job_id=done, queue_wait_s=0.25, ttft_s=0.5))

        migrate.upgrade(url)
        assert migrate.current(url) == "0011"
        assert _report_statistics(engine) in (1, None)
        inspector = sa.inspect(engine)
        made = set(inspector.get_view_names()) | set(inspector.get_table_names())
        assert made >= VIEWS | NEW_TABLES
        _assert_backfilled(engine, done)
        with engine.connect() as conn:  # a job that had not ended has no facts row
            assert conn.scalar(sa.select(sa.func.count()).select_from(FACTS)) == 1

        migrate.downgrade(url, "0003")
        assert migrate.current(url) == "0003"
        assert _report_statistics(engine) in (0, None)
        inspector = sa.inspect(engine)
        assert not VIEWS & set(inspector.get_view_names())
        assert not NEW_TABLES & set(inspector.get_table_names())
        assert _columns(engine, "job_metrics") == {
            "job_id",
            "queue_wait_s",
            "ttft_s",
            "prefill_s",
            "decode_s",
            "total_s",
            "decode_tokens_per_s",
        }
        assert not {"enqueued_at", "first_seen_at"} & _columns(engine, "jobs")
        with engine.connect() as conn:  # the 0003 row is still there
            kept = conn.execute(sa.select(METRICS).where(METRICS.c.job_id == done)).one()
        assert (kept.queue_wait_s, kept.ttft_s) == (0.25, 0.5)

        migrate.upgrade(url)
        assert migrate.current(url) == "0011"
        _assert_backfilled(engine, done)
    finally:
        engine.dispose()
