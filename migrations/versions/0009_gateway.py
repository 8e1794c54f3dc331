"""The gateway's tables (docs/gateway.md): API keys (one row per key, its SHA-256 only, the
tenant it acts as, an optional rate limit, revocation); uploaded files and their lines; OpenAI
batches and one row per request line (its custom_id and its job).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AT = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(JSONB(), "postgresql")
# written here, not imported: a revision stays as it was when later code changes
BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
STAMPS = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


# The batches report: each batch with what its jobs did and cost (job_metrics: one row per
# ended job). Plain SQL that PostgreSQL and SQLite both run.
BATCH_USAGE = """
CREATE VIEW api_batch_usage AS
SELECT b.id AS batch_id, b.tenant, b.endpoint, b.status, b.created_at, b.completed_at,
       count(r.line_no) AS requests,
       count(m.job_id) AS ended_jobs,
       sum(CASE WHEN m.status = 'done' THEN 1 ELSE 0 END) AS completed,
       sum(CASE WHEN r.job_id IS NULL THEN 1 ELSE 0 END) AS refused,
       coalesce(sum(m.prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(m.cached_prompt_tokens), 0) AS cached_prompt_tokens,
       coalesce(sum(m.completion_tokens), 0) AS completion_tokens,
       sum(m.compute_s) AS compute_s,
       sum(m.list_cost) AS list_cost,
       sum(m.compute_cost) AS compute_cost,
       avg(m.queue_wait_s) AS avg_queue_wait_s,
       max(m.finished_at) AS last_finished_at
FROM api_batches b
JOIN api_batch_requests r ON r.batch_id = b.id
LEFT JOIN job_metrics m ON m.job_id = r.job_id
GROUP BY b.id, b.tenant, b.endpoint, b.status, b.created_at, b.completed_at
"""


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("rate_limit_rpm", sa.Integer(), nullable=True),
        sa.Column("created_at", AT, nullable=False, server_default=sa.func.now()),
        sa.Column("revoked_at", AT, nullable=True),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    op.create_table(
        "api_files",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("lines", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column("kind", sa.String(8), nullable=True),
        sa.Column("created_at", AT, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_api_files_tenant_created_at", "api_files", ["tenant", "created_at"])
    op.create_table(
        "api_file_lines",
        sa.Column(
            "file_id",
            sa.Uuid(),
            sa.ForeignKey(
                "api_files.id", name="fk_api_file_lines_file_id_api_files", ondelete="CASCADE"
            ),
            primary_key=True,
        ),
        sa.Column("line_no", sa.Integer(), primary_key=True),
        sa.Column("body", sa.Text(), nullable=False),
    )
    statuses = ", ".join(f"'{s}'" for s in BATCH_STATUSES)
    op.create_table(
        "api_batches",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.Uuid(), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("output_file_id", sa.Uuid(), nullable=True),
        sa.Column("error_file_id", sa.Uuid(), nullable=True),
        sa.Column("errors", JSON, nullable=True),
        sa.Column("metadata", JSON, nullable=True),
        sa.Column("created_at", AT, nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", AT, nullable=False),
        *(sa.Column(f"{s}_at", AT, nullable=True) for s in STAMPS),
        sa.CheckConstraint(f"status IN ({statuses})", name="ck_api_batches_status"),
    )
    op.create_index("ix_api_batches_tenant_created_at", "api_batches", ["tenant", "created_at"])
    op.create_table(
        "api_batch_requests",
        sa.Column(
            "batch_id",
            sa.Uuid(),
            sa.ForeignKey(
                "api_batches.id",
                name="fk_api_batch_requests_batch_id_api_batches",
                ondelete="CASCADE",
            ),
            primary_key=True,
        ),
        sa.Column("line_no", sa.Integer(), primary_key=True),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_api_batch_requests_custom_id"),
    )
    op.create_index("ix_api_batch_requests_job_id", "api_batch_requests", ["job_id"])
    op.execute(BATCH_USAGE)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS api_batch_usage")
    op.drop_index("ix_api_batch_requests_job_id", table_name="api_batch_requests")
    op.drop_table("api_batch_requests")
    op.drop_index("ix_api_batches_tenant_created_at", table_name="api_batches")
    op.drop_table("api_batches")
    op.drop_table("api_file_lines")
    op.drop_index("ix_api_files_tenant_created_at", table_name="api_files")
    op.drop_table("api_files")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
