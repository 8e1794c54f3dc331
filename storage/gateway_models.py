"""The gateway's tables (docs/gateway.md): API keys, tenants' token quotas, uploaded files
and their lines, and OpenAI-style batches with one row per request line. A batch request's
job is an ordinary job (`jobs`, `results`, `job_metrics`), joined on `job_id`; there is no
foreign key, as a job row is written only when a worker first takes the job."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, JSONType, UTCDateTime

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


class ApiKey(Base):
    """A gateway API key (`inferq keys create TENANT`): only its SHA-256 is stored; the key
    acts as `tenant`, until revoked."""

    __tablename__ = "api_keys"
    __table_args__ = (
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        sa.Index("ix_api_keys_tenant", "tenant"),
    )

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    key_hash: Mapped[str] = mapped_column(sa.String(64))  # sha256 hex
    prefix: Mapped[str] = mapped_column(sa.String(16))  # the key's first characters, to tell
    rate_limit_rpm: Mapped[int | None] = mapped_column(sa.Integer)  # requests a minute; None: any
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiTenantQuota(Base):
    """A tenant's token quota (`inferq keys quota`): prompt and output tokens a minute and a
    day over all its keys; None: no limit. Counted in Redis (gateway/quota.py)."""

    __tablename__ = "api_tenant_quotas"

    tenant: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(sa.Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(sa.BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


class ApiFile(Base):
    """An uploaded file (`purpose` batch: its lines in `file_lines`). A batch's output and
    error files have no lines: they are written from the batch's jobs when read."""

    __tablename__ = "api_files"
    __table_args__ = (sa.Index("ix_api_files_tenant_created_at", "tenant", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    purpose: Mapped[str] = mapped_column(sa.String(32))  # batch | batch_output
    filename: Mapped[str] = mapped_column(sa.String(256))
    bytes: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    lines: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    batch_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)  # an output's batch
    kind: Mapped[str | None] = mapped_column(sa.String(8))  # an output's: output | error
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


class FileLine(Base):
    """One line of an uploaded file, as sent (JSON text)."""

    __tablename__ = "api_file_lines"

    file_id: Mapped[uuid.UUID] = mapped_column(
        sa.Uuid,
        sa.ForeignKey(
            "api_files.id", name="fk_api_file_lines_file_id_api_files", ondelete="CASCADE"
        ),
        primary_key=True,
    )
    line_no: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    body: Mapped[str] = mapped_column(sa.Text)


class ApiBatch(Base):
    """An OpenAI-style batch: its lifecycle timestamps; its counts come from its requests."""

    __tablename__ = "api_batches"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in BATCH_STATUSES)),
            name="ck_api_batches_status",
        ),
        sa.Index("ix_api_batches_tenant_created_at", "tenant", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    endpoint: Mapped[str] = mapped_column(sa.String(64))
    input_file_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
    completion_window: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16))
    total: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    output_file_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)
    error_file_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)
    errors: Mapped[list[Any] | None] = mapped_column(JSONType)  # why it failed validation
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)  # its driver's (db clock)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiBatchRequest(Base):
    """One line of a batch: its `custom_id` and its job (or why the line was refused)."""

    __tablename__ = "api_batch_requests"
    __table_args__ = (
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_api_batch_requests_custom_id"),
        sa.Index("ix_api_batch_requests_job_id", "job_id"),
    )

    batch_id: Mapped[uuid.UUID] = mapped_column(
        sa.Uuid,
        sa.ForeignKey(
            "api_batches.id", name="fk_api_batch_requests_batch_id_api_batches", ondelete="CASCADE"
        ),
        primary_key=True,
    )
    line_no: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(sa.String(512))
    job_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)  # None: refused (error)
    error: Mapped[str | None] = mapped_column(sa.Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last enqueued (None: not yet)


api_keys_table: sa.Table = ApiKey.__table__  # type: ignore[assignment]
tenant_quotas_table: sa.Table = ApiTenantQuota.__table__  # type: ignore[assignment]
files_table: sa.Table = ApiFile.__table__  # type: ignore[assignment]
file_lines_table: sa.Table = FileLine.__table__  # type: ignore[assignment]
api_batches_table: sa.Table = ApiBatch.__table__  # type: ignore[assignment]
api_batch_requests_table: sa.Table = ApiBatchRequest.__table__  # type: ignore[assignment]
