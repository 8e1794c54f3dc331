"""How many times the sweeper sent a job again: `jobs.resends` (past a limit it fails).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE on both dialects (SQLite 3.35+ drops columns): a batch rebuild of `jobs`
# would break the reporting views that read it.


def upgrade() -> None:
    op.add_column("jobs", sa.Column("resends", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("jobs", "resends")
