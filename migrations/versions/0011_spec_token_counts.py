"""Speculative decoding's per-job counts in `job_metrics` (docs/speculative.md):
`spec_drafted_tokens` (tokens drafted by prompt lookup and verified for the job) and
`spec_accepted_tokens` (of those, the ones the model kept). Both NOT NULL with a server default
of 0, so rows from before this revision, and jobs run without speculation, read 0; on
PostgreSQL 11+ a constant default is a catalog change (no table rewrite).

A worker from before this revision writes neither column (the default fills them): migrate
first or last, either works.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("spec_drafted_tokens", "spec_accepted_tokens")


# plain ALTERs (SQLite too, as in 0010): a table rebuild would trip over the views on job_metrics


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column(
            "job_metrics", sa.Column(name, sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("job_metrics", name)
