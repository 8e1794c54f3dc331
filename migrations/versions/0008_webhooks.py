"""Webhooks: `jobs.callback_url`, the outbox of deliveries written with a job's end, and one
row per delivery attempt (docs/webhooks.md).

A worker from before this revision neither writes nor sends deliveries: migrate first, then
deploy the new workers, then let producers send `callback_url` (an older worker dead-letters a
message that carries one).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-16 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AT = sa.DateTime(timezone=True)


# Plain ALTER TABLE on both dialects for `jobs`, as in 0006 (a batch rebuild of `jobs` would
# break the reporting views that read it).


def upgrade() -> None:
    op.add_column("jobs", sa.Column("callback_url", sa.String(2048), nullable=True))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column(
            "job_id",
            sa.Uuid(),
            sa.ForeignKey("jobs.id", name="fk_webhook_deliveries_job_id_jobs", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", AT, nullable=False, server_default=sa.func.now()),
        sa.Column("next_attempt_at", AT, nullable=False, server_default=sa.func.now()),
        sa.Column("leased_by", sa.String(256), nullable=True),
        sa.Column("ended_at", AT, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("job_id", "event", name="uq_webhook_deliveries_job_id_event"),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_state"
        ),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])
    op.create_table(
        "webhook_attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "delivery_id",
            sa.Uuid(),
            sa.ForeignKey(
                "webhook_deliveries.id",
                name="fk_webhook_attempts_delivery_id_webhook_deliveries",
                ondelete="CASCADE",
            ),
            nullable=False,
        ),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(512), nullable=True),
        sa.Column("worker", sa.String(256), nullable=True),
        sa.Column("started_at", AT, nullable=False),
        sa.UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempts_delivery_attempt"),
    )
    op.create_index("ix_webhook_attempts_job_id", "webhook_attempts", ["job_id"])
    op.create_index("ix_webhook_attempts_started_at", "webhook_attempts", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_attempts_started_at", table_name="webhook_attempts")
    op.drop_index("ix_webhook_attempts_job_id", table_name="webhook_attempts")
    op.drop_table("webhook_attempts")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_column("jobs", "callback_url")
