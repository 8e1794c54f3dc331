"""The gateway's token quotas and resumable batches: `api_tenant_quotas` (a tenant's tokens a
minute and a day); `api_batches.lease_until` (the gateway driving a batch holds it, on the
database's clock; a lapsed lease lets another take the batch on); `api_batch_requests.sent_at`
(when a line's job was last enqueued: a line not sent yet is sent by whoever drives on).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 00:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AT = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_tenant_quotas",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("tokens_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_day", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", AT, nullable=False, server_default=sa.func.now()),
    )
    # plain ALTERs (SQLite too): a table rebuild would trip over the api_batch_usage view
    op.add_column("api_batches", sa.Column("lease_until", AT, nullable=True))
    op.add_column("api_batch_requests", sa.Column("sent_at", AT, nullable=True))
    # lines of batches from before this revision were enqueued as their rows were written
    op.execute("UPDATE api_batch_requests SET sent_at = CURRENT_TIMESTAMP WHERE job_id IS NOT NULL")


def downgrade() -> None:
    op.drop_column("api_batch_requests", "sent_at")
    op.drop_column("api_batches", "lease_until")
    op.drop_table("api_tenant_quotas")
