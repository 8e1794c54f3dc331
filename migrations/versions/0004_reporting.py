"""Reporting: per-job facts and costs in `job_metrics`, prices, compute rates, worker usage,
and the report views.

`job_metrics` becomes one row per ended job (tenant, model, status, timestamps, tokens,
compute seconds, price version and costs); `jobs` gains `enqueued_at` (producer clock) and
`first_seen_at` (first worker receipt). Views: `job_report`, `usage_daily`, `engine_hourly`,
`failures_daily` everywhere, and `latency_hourly` (percentiles) on PostgreSQL only: SQLite has
no percentile aggregate, `inferq report` computes those there.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 00:00:02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(20, 10)
TOKENS = ("prompt_tokens", "cached_prompt_tokens", "computed_prompt_tokens", "completion_tokens")


def _facts() -> list[sa.Column]:
    """The columns `job_metrics` gains (fresh objects for each use)."""
    return [
        sa.Column("tenant", sa.String(128)),
        sa.Column("model", sa.String(256)),
        sa.Column("status", sa.String(16)),
        sa.Column("worker", sa.String(256)),
        sa.Column("device", sa.String(64)),
        sa.Column("attempts", sa.Integer),
        sa.Column("enqueued_at", TS),
        sa.Column("first_seen_at", TS),
        sa.Column("admitted_at", TS),
        sa.Column("first_token_at", TS),
        sa.Column("finished_at", TS),
        *(sa.Column(name, sa.Integer, nullable=False, server_default="0") for name in TOKENS),
        sa.Column("compute_s", sa.Float, nullable=False, server_default="0"),
        sa.Column("price_id", sa.Integer),
        sa.Column("rate_id", sa.Integer),
        sa.Column("list_cost", MONEY),
        sa.Column("compute_cost", MONEY),
        sa.Column("cache_savings", MONEY),
    ]


INDEXES = {
    "ix_job_metrics_finished_at": ["finished_at"],
    "ix_job_metrics_tenant_finished_at": ["tenant", "finished_at"],
    "ix_job_metrics_model_finished_at": ["model", "finished_at"],
}
COUNTERS = (
    "steps",
    "seq_steps",
    "prefill_tokens",
    "decode_tokens",
    "recompute_tokens",
    "cache_queried_tokens",
    "cache_hit_tokens",
)
LATENCIES = ("queue_wait_s", "ttft_s", "total_s", "decode_tokens_per_s")
VIEWS = ("job_report", "usage_daily", "engine_hourly", "failures_daily", "latency_hourly")


def _dialect_sql() -> dict[str, str]:
    """Day/hour buckets (UTC) and the failure reason (error text before its first colon)."""
    if op.get_bind().dialect.name == "postgresql":
        return {
            "day": "CAST({0} AT TIME ZONE 'UTC' AS DATE)",
            "hour": "date_trunc('hour', {0} AT TIME ZONE 'UTC')",
            "reason": "left(split_part(coalesce({0}, ''), ':', 1), 80)",
        }
    return {
        "day": "date({0})",
        "hour": "strftime('%Y-%m-%d %H:00:00', {0})",
        "reason": "substr(coalesce({0}, ''), 1, min(instr(coalesce({0}, '') || ':', ':') - 1, 80))",
    }


def _views() -> dict[str, str]:
    sql = _dialect_sql()
    day, hour, reason = sql["day"].format, sql["hour"].format, sql["reason"].format
    count = "SUM(CASE WHEN status = '{0}' THEN 1 ELSE 0 END) AS {0}".format
    views = {
        "job_report": """
            SELECT j.id AS job_id, j.tenant, j.model, j.status, j.priority, j.attempts, j.worker,
                   m.device, j.error, j.queued_at, m.enqueued_at,
                   coalesce(m.first_seen_at, j.first_seen_at) AS first_seen_at, m.admitted_at,
                   m.first_token_at, coalesce(m.finished_at, j.finished_at) AS finished_at,
                   m.queue_wait_s, m.ttft_s, m.prefill_s AS ttft_from_admission_s, m.decode_s,
                   m.total_s, m.decode_tokens_per_s, m.prompt_tokens, m.cached_prompt_tokens,
                   m.computed_prompt_tokens, m.completion_tokens, m.compute_s, m.price_id,
                   m.rate_id, m.list_cost, m.compute_cost, m.cache_savings
            FROM jobs j LEFT JOIN job_metrics m ON m.job_id = j.id""",
        "usage_daily": f"""
            SELECT tenant, model, {day("finished_at")} AS day, COUNT(*) AS jobs,
                   {count("done")}, {count("failed")}, {count("cancelled")}, {count("expired")},
                   SUM(prompt_tokens) AS prompt_tokens,
                   SUM(cached_prompt_tokens) AS cached_prompt_tokens,
                   SUM(computed_prompt_tokens) AS computed_prompt_tokens,
                   SUM(completion_tokens) AS completion_tokens, SUM(compute_s) AS compute_s,
                   SUM(list_cost) AS list_cost, SUM(compute_cost) AS compute_cost,
                   SUM(cache_savings) AS cache_savings
            FROM job_metrics WHERE finished_at IS NOT NULL
            GROUP BY tenant, model, {day("finished_at")}""",
        "engine_hourly": """
            SELECT worker, model, hour, device, busy_s, idle_s,
                   busy_s / NULLIF(busy_s + idle_s, 0) AS busy_share, steps,
                   seq_steps / NULLIF(busy_s + idle_s, 0) AS output_tokens_per_s,
                   (prefill_tokens + decode_tokens) / NULLIF(busy_s, 0)
                       AS computed_tokens_per_busy_s,
                   CAST(seq_steps AS FLOAT) / NULLIF(steps, 0) AS mean_running_seqs,
                   CAST(cache_hit_tokens AS FLOAT) / NULLIF(cache_queried_tokens, 0)
                       AS prefix_hit_rate,
                   prefill_tokens, decode_tokens, recompute_tokens
            FROM worker_usage""",
        "failures_daily": f"""
            SELECT {day("received_at")} AS day, 'dead_letter' AS kind, reason,
                   COUNT(*) AS count
            FROM dead_letters GROUP BY {day("received_at")}, reason
            UNION ALL
            SELECT {day("m.finished_at")} AS day, m.status AS kind, {reason("j.error")} AS reason,
                   COUNT(*) AS count
            FROM job_metrics m JOIN jobs j ON j.id = m.job_id
            WHERE m.status IN ('failed', 'expired')
            GROUP BY {day("m.finished_at")}, m.status, {reason("j.error")}""",
    }
    if op.get_bind().dialect.name == "postgresql":
        cuts = ", ".join(
            f"percentile_cont({q / 100}) WITHIN GROUP (ORDER BY {col}) AS {col}_p{q}"
            for col in LATENCIES
            for q in (50, 95, 99)
        )
        views["latency_hourly"] = f"""
            SELECT model, {hour("finished_at")} AS hour, COUNT(*) AS jobs, {cuts}
            FROM job_metrics WHERE status = 'done'
            GROUP BY model, {hour("finished_at")}"""
    return views


def _versioned(table: str, key: str, *money: str, unique: str) -> None:
    """A table of versions: one row per (key, effective_from), amounts, currency."""
    op.create_table(
        table,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(key, sa.String(256), nullable=False),
        sa.Column("effective_from", TS, nullable=False),
        *(sa.Column(name, MONEY, nullable=False) for name in money),
        sa.Column("currency", sa.String(8), nullable=False, server_default="USD"),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint(key, "effective_from", name=unique),
    )


def upgrade() -> None:
    _versioned(
        "prices",
        "model",
        "prompt_per_mtok",
        "cached_prompt_per_mtok",
        "completion_per_mtok",
        unique="uq_prices_model_from",
    )
    _versioned("compute_rates", "target", "per_hour", unique="uq_compute_rates_target_from")
    op.create_table(
        "worker_usage",
        sa.Column("worker", sa.String(256), primary_key=True),
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("hour", TS, primary_key=True),
        sa.Column("device", sa.String(64)),
        sa.Column("busy_s", sa.Float, nullable=False, server_default="0"),
        sa.Column("idle_s", sa.Float, nullable=False, server_default="0"),
        *(sa.Column(n, sa.BigInteger, nullable=False, server_default="0") for n in COUNTERS),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", TS, nullable=True))
        batch.add_column(sa.Column("first_seen_at", TS, nullable=True))
    with op.batch_alter_table("job_metrics") as batch:
        for column in _facts():
            batch.add_column(column)
        batch.create_foreign_key("fk_job_metrics_price_id_prices", "prices", ["price_id"], ["id"])
        batch.create_foreign_key(
            "fk_job_metrics_rate_id_compute_rates", "compute_rates", ["rate_id"], ["id"]
        )
    # rows written before: their job's identity and tokens
    of_job = "(SELECT {0} FROM jobs j WHERE j.id = job_metrics.job_id)".format
    of_result = (
        "coalesce((SELECT {0} FROM results r WHERE r.job_id = job_metrics.job_id), 0)".format
    )
    pairs = {
        c: of_job(c) for c in ("tenant", "model", "status", "worker", "attempts", "finished_at")
    }
    pairs.update(
        first_seen_at=of_job("started_at"),
        prompt_tokens=of_result("prompt_tokens"),
        cached_prompt_tokens=of_result("cached_tokens"),
        completion_tokens=of_result("completion_tokens"),
    )
    assignments = ", ".join(f"{column} = {value}" for column, value in pairs.items())
    op.execute(f"UPDATE job_metrics SET {assignments}")
    op.execute(
        "UPDATE job_metrics SET computed_prompt_tokens = prompt_tokens - cached_prompt_tokens"
    )
    for name, columns in INDEXES.items():
        op.create_index(name, "job_metrics", columns)
    for name, sql in _views().items():
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name in INDEXES:
        op.drop_index(name, table_name="job_metrics")
    with op.batch_alter_table("job_metrics") as batch:
        batch.drop_constraint("fk_job_metrics_rate_id_compute_rates", type_="foreignkey")
        batch.drop_constraint("fk_job_metrics_price_id_prices", type_="foreignkey")
        for column in reversed(_facts()):
            batch.drop_column(column.name)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("first_seen_at")
        batch.drop_column("enqueued_at")
    op.drop_table("worker_usage")
    op.drop_table("compute_rates")
    op.drop_table("prices")
