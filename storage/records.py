"""Plain dataclasses going in and out of `storage.repository.Repository`."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # its deadline passed before it finished


ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
TERMINAL_STATUSES = frozenset(set(JobStatus) - ACTIVE_STATUSES)


def utcnow() -> datetime:
    """The current time, tz-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """`value` as tz-aware UTC (naive values are taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(slots=True)
class NewJob:
    """A job to insert with status `queued`."""

    id: uuid.UUID
    tenant: str
    model: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    idempotency_key: str | None = None
    queued_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None

    def row(self) -> dict[str, Any]:
        """Column values for the `jobs` table."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "idempotency_key": self.idempotency_key,
            "model": self.model,
            "prompt": self.prompt,
            "messages": self.messages,
            "params": self.params,
            "status": "queued",
            "priority": self.priority,
            "queued_at": as_utc(self.queued_at),
            "expires_at": self.expires_at and as_utc(self.expires_at),
            "attempts": 0,
        }


@dataclass(frozen=True, slots=True)
class JobState:
    """A job's status and delivery count, as `claim` left them; `id` is the canonical job
    (another job's id when the message repeated an idempotency key)."""

    id: uuid.UUID
    status: JobStatus
    attempts: int


@dataclass(slots=True)
class BatchRecord:
    """A batch row: the jobs one engine step admitted together, and their figures so far."""

    id: uuid.UUID
    worker: str
    model: str
    size: int
    real_tokens: int  # tokens computed for its jobs (prefill, recompute, decode)
    padded_tokens: int  # the same with padding: equal for the paged engine
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None
    stats: dict[str, Any] | None = None


@dataclass(slots=True)
class ResultRow:
    """The generated output of one job."""

    job_id: uuid.UUID
    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class MetricsRow:
    """Per-job timings in seconds (None where not measured)."""

    job_id: uuid.UUID
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    decode_tokens_per_s: float | None = None


@dataclass(slots=True)
class FinishedJob:
    """A job's result and metrics, and the batch that ran it."""

    result: ResultRow
    metrics: MetricsRow
    batch_id: uuid.UUID | None
    finished_at: datetime


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


@dataclass(slots=True)
class JobView:
    """A job as read back, with its result and metrics when present."""

    id: uuid.UUID
    tenant: str
    model: str
    status: str
    priority: int
    attempts: int
    error: str | None
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    batch_id: uuid.UUID | None
    idempotency_key: str | None = None
    expires_at: datetime | None = None
    result: ResultRow | None = None
    metrics: MetricsRow | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: ISO-8601 datetimes, string UUIDs."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ResultRow | MetricsRow):
                out[f.name] = {
                    k: _plain(v) for k, v in dataclasses.asdict(value).items() if k != "job_id"
                }
            else:
                out[f.name] = _plain(value)
        return out
