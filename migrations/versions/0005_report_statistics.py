"""PostgreSQL planner statistics for the daily reports: the number of distinct (tenant, model,
UTC day) groups in `job_metrics`. Without them the planner guesses 5,000 groups and picks a
sort that spills to disk (1M jobs over 90 days: 1.14 s -> 0.50 s; docs/reporting-scale.md).
Nothing to do on SQLite.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 00:00:03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgresql():
        op.execute(
            "CREATE STATISTICS st_job_metrics_usage_day (ndistinct) ON tenant, model, "
            "(CAST(finished_at AT TIME ZONE 'UTC' AS DATE)) FROM job_metrics"
        )
        op.execute("ANALYZE job_metrics")


def downgrade() -> None:
    if _postgresql():
        op.execute("DROP STATISTICS IF EXISTS st_job_metrics_usage_day")
