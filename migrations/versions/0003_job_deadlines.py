"""Job deadlines: `jobs.expires_at` and the `expired` status.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 00:00:01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = ("queued", "running", "done", "failed", "cancelled")
NEW = (*OLD, "expired")


def _check(statuses: tuple[str, ...]) -> str:
    return "status IN ({})".format(", ".join(f"'{s}'" for s in statuses))


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint("ck_jobs_status", type_="check")
        batch.create_check_constraint("ck_jobs_status", _check(NEW))


def downgrade() -> None:
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'expired'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_status", type_="check")
        batch.create_check_constraint("ck_jobs_status", _check(OLD))
        batch.drop_column("expires_at")
