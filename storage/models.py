"""Declarative models for the inferq schema (portable: PostgreSQL and SQLite)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.records import JobStatus

JOB_STATUSES: tuple[str, ...] = tuple(JobStatus)
#: JSON everywhere, JSONB on PostgreSQL; Python None is SQL NULL (not JSON 'null').
JSONType = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
STATUS_CHECK = "status IN ({})".format(", ".join(f"'{s}'" for s in JOB_STATUSES))


class UTCDateTime(sa.TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that is always tz-aware UTC in Python (naive means UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; `Base.metadata` is Alembic's target metadata."""


class Batch(Base):
    """One forward-pass batch run by a worker."""

    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    worker: Mapped[str] = mapped_column(sa.String(256))
    model: Mapped[str] = mapped_column(sa.String(256))
    size: Mapped[int] = mapped_column(sa.Integer)
    real_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_s: Mapped[float | None] = mapped_column(sa.Float)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class Job(Base):
    """A generation job and its lifecycle."""

    __tablename__ = "jobs"
    __table_args__ = (
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        sa.CheckConstraint(STATUS_CHECK, name="ck_jobs_status"),
        sa.Index("ix_jobs_status", "status"),
        sa.Index("ix_jobs_queued_at", "queued_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(256))
    model: Mapped[str] = mapped_column(sa.String(256))
    prompt: Mapped[str | None] = mapped_column(sa.Text)
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(sa.String(16))
    priority: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(sa.Text)
    worker: Mapped[str | None] = mapped_column(sa.String(256))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.Uuid, sa.ForeignKey("batches.id", name="fk_jobs_batch_id_batches", ondelete="SET NULL")
    )
    requeued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # by the sweeper
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the job's deadline
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # producer clock, bounded
    first_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # first worker receipt
    resends: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")  # sweeper
    callback_url: Mapped[str | None] = mapped_column(sa.String(2048))  # webhook when it ends


class Result(Base):
    """The generated text of a finished job (at most one per job)."""

    __tablename__ = "results"

    job_id: Mapped[uuid.UUID] = mapped_column(
        sa.Uuid,
        sa.ForeignKey("jobs.id", name="fk_results_job_id_jobs", ondelete="CASCADE"),
        primary_key=True,
    )
    text: Mapped[str] = mapped_column(sa.Text)
    finish_reason: Mapped[str] = mapped_column(sa.String(16))
    prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


Money = sa.Numeric(20, 10)  # exact decimals: currency units, 10 places


class JobMetrics(Base):
    """One row per ended job: what it did, waited, computed and cost (the reporting facts).

    Written by the storage layer whenever a job ends (done, failed, cancelled, expired), in the
    same transaction as its status; `tenant`, `model` and `status` repeat the job's so reports
    read this narrow table alone.
    """

    __tablename__ = "job_metrics"
    __table_args__ = (
        sa.Index("ix_job_metrics_finished_at", "finished_at"),
        sa.Index("ix_job_metrics_tenant_finished_at", "tenant", "finished_at"),
        sa.Index("ix_job_metrics_model_finished_at", "model", "finished_at"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(
        sa.Uuid,
        sa.ForeignKey("jobs.id", name="fk_job_metrics_job_id_jobs", ondelete="CASCADE"),
        primary_key=True,
    )
    tenant: Mapped[str | None] = mapped_column(sa.String(128))
    model: Mapped[str | None] = mapped_column(sa.String(256))
    status: Mapped[str | None] = mapped_column(sa.String(16))
    worker: Mapped[str | None] = mapped_column(sa.String(256))
    device: Mapped[str | None] = mapped_column(sa.String(64))
    attempts: Mapped[int | None] = mapped_column(sa.Integer)
    # timestamps: producer clock (bounded; NULL when the producer sent none), then worker clock
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    first_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    admitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    first_token_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # tokens: prompt_tokens includes cached ones (the OpenAI convention)
    prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    cached_prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    computed_prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    # speculative decoding (docs/speculative.md): tokens drafted and verified, and those kept
    spec_drafted_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    spec_accepted_tokens: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    compute_s: Mapped[float] = mapped_column(sa.Float, default=0.0, server_default="0")
    # durations in seconds, derived from the timestamps when the job ended
    queue_wait_s: Mapped[float | None] = mapped_column(sa.Float)
    ttft_s: Mapped[float | None] = mapped_column(sa.Float)
    prefill_s: Mapped[float | None] = mapped_column(sa.Float)
    decode_s: Mapped[float | None] = mapped_column(sa.Float)
    total_s: Mapped[float | None] = mapped_column(sa.Float)
    decode_tokens_per_s: Mapped[float | None] = mapped_column(sa.Float)
    # billing, fixed when the job ends
    price_id: Mapped[int | None] = mapped_column(
        sa.Integer, sa.ForeignKey("prices.id", name="fk_job_metrics_price_id_prices")
    )
    rate_id: Mapped[int | None] = mapped_column(
        sa.Integer, sa.ForeignKey("compute_rates.id", name="fk_job_metrics_rate_id_compute_rates")
    )
    list_cost: Mapped[Decimal | None] = mapped_column(Money)
    compute_cost: Mapped[Decimal | None] = mapped_column(Money)
    cache_savings: Mapped[Decimal | None] = mapped_column(Money)


class Price(Base):
    """A model's list prices per million tokens from `effective_from` on (rows are versions:
    never updated; a job records the id it was billed at)."""

    __tablename__ = "prices"
    __table_args__ = (sa.UniqueConstraint("model", "effective_from", name="uq_prices_model_from"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(sa.String(256))
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    prompt_per_mtok: Mapped[Decimal] = mapped_column(Money)
    cached_prompt_per_mtok: Mapped[Decimal] = mapped_column(Money)
    completion_per_mtok: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(sa.String(8), default="USD", server_default="USD")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


class ComputeRate(Base):
    """What an hour of a worker (by name) or a device class (`cpu`, `cuda:NVIDIA H200`) costs
    from `effective_from` on; a worker's own rate wins over its device class's."""

    __tablename__ = "compute_rates"
    __table_args__ = (
        sa.UniqueConstraint("target", "effective_from", name="uq_compute_rates_target_from"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    target: Mapped[str] = mapped_column(sa.String(256))
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    per_hour: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(sa.String(8), default="USD", server_default="USD")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


class WorkerUsage(Base):
    """A worker's engine time per model per hour: busy (stepping) and idle (nothing to run)
    seconds and what the steps computed. Added to by the result sink."""

    __tablename__ = "worker_usage"

    worker: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    device: Mapped[str | None] = mapped_column(sa.String(64))
    busy_s: Mapped[float] = mapped_column(sa.Float, default=0.0, server_default="0")
    idle_s: Mapped[float] = mapped_column(sa.Float, default=0.0, server_default="0")
    steps: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    seq_steps: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    prefill_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    decode_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    recompute_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    cache_queried_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    cache_hit_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")


class Worker(Base):
    """A worker process and its heartbeat (the sweeper requeues a silent worker's jobs)."""

    __tablename__ = "workers"
    __table_args__ = (sa.Index("ix_workers_last_seen_at", "last_seen_at"),)

    name: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    models: Mapped[list[str] | None] = mapped_column(JSONType)


class DeadLetter(Base):
    """A message the worker could not run (not JSON, unknown task, invalid job), kept whole."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    reason: Mapped[str] = mapped_column(sa.String(128))
    error: Mapped[str | None] = mapped_column(sa.Text)
    job_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class WebhookDelivery(Base):
    """One webhook to send: written with the job's end in the same transaction (the outbox),
    its body frozen then; `id` is the `webhook-id` header, the same on every attempt. While an
    attempt runs, `next_attempt_at` is the end of the sender's lease (the database's clock)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "event", name="uq_webhook_deliveries_job_id_event"),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_state"
        ),
        sa.Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        sa.Uuid,
        sa.ForeignKey("jobs.id", name="fk_webhook_deliveries_job_id_jobs", ondelete="CASCADE"),
    )
    tenant: Mapped[str] = mapped_column(sa.String(128))
    event: Mapped[str] = mapped_column(sa.String(16))  # the job's status it reports
    body: Mapped[str] = mapped_column(sa.Text)  # the JSON sent, byte for byte (UTF-8)
    state: Mapped[str] = mapped_column(sa.String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    leased_by: Mapped[str | None] = mapped_column(sa.String(256))  # the last worker to claim it
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # delivered or given up
    error: Mapped[str | None] = mapped_column(sa.Text)  # why it was given up


class WebhookAttempt(Base):
    """One POST of a delivery (or its refusal before any): what happened, on which worker."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        sa.UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempts_delivery_attempt"),
        sa.Index("ix_webhook_attempts_job_id", "job_id"),
        sa.Index("ix_webhook_attempts_started_at", "started_at"),
    )

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        sa.Uuid,
        sa.ForeignKey(
            "webhook_deliveries.id",
            name="fk_webhook_attempts_delivery_id_webhook_deliveries",
            ondelete="CASCADE",
        ),
    )
    job_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    attempt: Mapped[int] = mapped_column(sa.Integer)  # 1, 2, ... per delivery
    status: Mapped[str] = mapped_column(sa.String(16))  # delivered | failed | refused
    http_status: Mapped[int | None] = mapped_column(sa.Integer)
    latency_ms: Mapped[int | None] = mapped_column(sa.Integer)
    error: Mapped[str | None] = mapped_column(sa.String(512))  # an error class or a reason
    worker: Mapped[str | None] = mapped_column(sa.String(256))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)  # the database's clock


jobs_table: sa.Table = Job.__table__  # type: ignore[assignment]
batches_table: sa.Table = Batch.__table__  # type: ignore[assignment]
results_table: sa.Table = Result.__table__  # type: ignore[assignment]
job_metrics_table: sa.Table = JobMetrics.__table__  # type: ignore[assignment]
prices_table: sa.Table = Price.__table__  # type: ignore[assignment]
compute_rates_table: sa.Table = ComputeRate.__table__  # type: ignore[assignment]
worker_usage_table: sa.Table = WorkerUsage.__table__  # type: ignore[assignment]
dead_letters_table: sa.Table = DeadLetter.__table__  # type: ignore[assignment]
workers_table: sa.Table = Worker.__table__  # type: ignore[assignment]
webhook_deliveries_table: sa.Table = WebhookDelivery.__table__  # type: ignore[assignment]
webhook_attempts_table: sa.Table = WebhookAttempt.__table__  # type: ignore[assignment]

# The gateway's tables (API keys, files, batches) are declared on the same Base: importing
# this module registers them (Alembic's target metadata holds every table).
import storage.gateway_models  # noqa: E402, F401
