"""Drop `batches.padded_tokens`: it was `real_tokens` again (the paged engine pads nothing), and
nothing read it.

A worker from before this revision still writes the column: deploy the new workers first (they
write nothing to it, and its server default fills it until this runs), then migrate.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-15 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE on both dialects (SQLite 3.35+ drops columns), as in 0006.


def upgrade() -> None:
    op.drop_column("batches", "padded_tokens")


def downgrade() -> None:
    """The column comes back as it was written: equal to `real_tokens`."""
    op.add_column(
        "batches", sa.Column("padded_tokens", sa.Integer(), nullable=False, server_default="0")
    )
    op.execute("UPDATE batches SET padded_tokens = real_tokens")
