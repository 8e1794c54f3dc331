"""Plain dataclasses going in and out of `storage.repository.Repository`."""

from __future__ import annotations

import dataclasses
import functools
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
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
    enqueued_at: datetime | None = None  # the producer's clock, bounded; None: not sent
    callback_url: str | None = None  # a webhook when the job ends

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
            "enqueued_at": self.enqueued_at and as_utc(self.enqueued_at),
            "attempts": 0,
            "callback_url": self.callback_url,
        }

    def content(self) -> tuple[Any, ...]:
        """What the job is: whose, and what to run how (`CONTENT_COLUMNS`, in that order).
        A message is this job only when it says the same; times and deadlines are not part
        of it (a resend or a producer's clock may state them differently)."""
        return tuple(getattr(self, name) for name in CONTENT_COLUMNS)


#: The `jobs` columns that make a job what it is; a message with a stored job's id but other
#: values here is not that job.
CONTENT_COLUMNS = ("tenant", "model", "prompt", "messages", "params", "priority", "idempotency_key")


@dataclass(frozen=True, slots=True)
class JobState:
    """A job's status and delivery count, as `claim` left them; `id` is the canonical job
    (another job's id when the message repeated an idempotency key). `worker` is the worker
    it runs on, `expires_at` its stored deadline and `content` its stored `NewJob.content()`
    (None for a canonical job of another id): a message whose content differs is not this
    job, and `claim` left the row as it was. `view` is the whole job as the claim committed
    it (None where a state was made otherwise)."""

    id: uuid.UUID
    status: JobStatus
    attempts: int
    worker: str | None = field(default=None, compare=False)
    expires_at: datetime | None = field(default=None, compare=False)
    content: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)
    view: JobView | None = field(default=None, compare=False, repr=False)

    def is_job_of(self, job: NewJob) -> bool:
        """Whether a message's job is this stored job (same id and same content)."""
        return (
            self.id == job.id
            and self.content is not None
            and same_content(self.content, job.content())
        )


def same_content(stored: tuple[Any, ...], sent: tuple[Any, ...]) -> bool:
    """Whether a message's `NewJob.content()` is a stored job's: equal column by column,
    except that stored `params` may lack keys (a row written by an older version, before a
    parameter existed): the keys it has must hold the message's values."""
    at = CONTENT_COLUMNS.index("params")
    rest = [i for i in range(len(CONTENT_COLUMNS)) if i != at]
    if any(stored[i] != sent[i] for i in rest):
        return False
    kept, given = stored[at] or {}, sent[at] or {}
    return isinstance(kept, dict) and all(k in given and given[k] == v for k, v in kept.items())


@dataclass(slots=True)
class BatchRecord:
    """A batch row: the jobs one engine step admitted together, and their figures so far."""

    id: uuid.UUID
    worker: str
    model: str
    size: int
    real_tokens: int  # tokens computed for its jobs (prefill, recompute, decode)
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None
    stats: dict[str, Any] | None = None


@dataclass(slots=True)
class ResultRow:
    """The generated output of one job, as read back (`JobView.result`)."""

    job_id: uuid.UUID
    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class MetricsRow:
    """Per-job timings in seconds (None where not measured), compute seconds and costs."""

    job_id: uuid.UUID
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    decode_tokens_per_s: float | None = None
    compute_s: float = 0.0
    list_cost: Decimal | None = None
    compute_cost: Decimal | None = None
    cache_savings: Decimal | None = None


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    return None if later is None or earlier is None else (later - earlier).total_seconds()


@dataclass(slots=True)
class EndedJob:
    """What a worker records for one job that ended, the one record the result sink writes:
    its output when it finished (`text`; None when it ended without one: cancelled, expired,
    failed, so only its compute is billed), timestamps (the enqueue time is the producer's,
    None when it sent none), tokens, the engine seconds attributed to it and the batch row of
    the step that admitted it."""

    job_id: uuid.UUID
    model: str
    worker: str
    device: str
    finished_at: datetime
    compute_s: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    batch_id: uuid.UUID | None = None
    enqueued_at: datetime | None = None
    admitted_at: datetime | None = None
    first_token_at: datetime | None = None
    prompt_tokens: int = 0  # includes the cached ones (the OpenAI convention)
    cached_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0  # prefill work: uncached, plus recompute after preemption
    completion_tokens: int = 0
    spec_drafted_tokens: int = 0  # speculative tokens drafted and verified (docs/speculative.md)
    spec_accepted_tokens: int = 0  # of those, the ones kept

    @property
    def with_result(self) -> bool:
        return self.text is not None

    def result(self) -> dict[str, Any]:
        """Its `results` row (a job with a result)."""
        return {
            "job_id": self.job_id,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_prompt_tokens,
        }

    @property
    def targets(self) -> tuple[str, str]:
        """Where a compute rate may be set: the worker, then its device class."""
        return self.worker, self.device

    def facts(self) -> dict[str, Any]:
        """`job_metrics` columns: identity of the work, and with a result, its timings."""
        row: dict[str, Any] = {
            "job_id": self.job_id,
            "device": self.device,
            "compute_s": self.compute_s,
        }
        if not self.with_result:
            return row
        decode_s = _seconds(self.finished_at, self.first_token_at)
        decoded = max(self.completion_tokens - 1, 0)
        row.update(
            admitted_at=self.admitted_at,
            first_token_at=self.first_token_at,
            finished_at=self.finished_at,
            prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            computed_prompt_tokens=self.computed_prompt_tokens,
            completion_tokens=self.completion_tokens,
            spec_drafted_tokens=self.spec_drafted_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
            queue_wait_s=_seconds(self.admitted_at, self.enqueued_at),
            ttft_s=_seconds(self.first_token_at, self.enqueued_at),
            prefill_s=_seconds(self.first_token_at, self.admitted_at),
            decode_s=decode_s,
            total_s=_seconds(self.finished_at, self.enqueued_at),
            decode_tokens_per_s=decoded / decode_s if decode_s else None,
        )
        return row


@dataclass(slots=True)
class UsageDelta:
    """Engine time and counters of one worker and model to add to an hour's usage row."""

    worker: str
    model: str
    hour: datetime
    device: str = ""
    busy_s: float = 0.0  # stepping
    idle_s: float = 0.0  # nothing to run
    steps: int = 0
    seq_steps: int = 0  # sequences computed, summed over steps (= tokens sampled)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    recompute_tokens: int = 0  # prefill of sequences preempted earlier
    cache_queried_tokens: int = 0
    cache_hit_tokens: int = 0

    def __add__(self, other: UsageDelta) -> UsageDelta:
        summed = {n: getattr(self, n) + getattr(other, n) for n in USAGE_FIGURES}
        return dataclasses.replace(self, **summed)


#: What a `UsageDelta` adds up: engine seconds, then counters (as `EngineStats` names them).
USAGE_SECONDS = ("busy_s", "idle_s")
USAGE_COUNTS = (
    "steps",
    "seq_steps",
    "prefill_tokens",
    "decode_tokens",
    "recompute_tokens",
    "cache_queried_tokens",
    "cache_hit_tokens",
)
USAGE_FIGURES = USAGE_SECONDS + USAGE_COUNTS


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, uuid.UUID | Decimal):
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
        """JSON-friendly dict: ISO-8601 datetimes, string UUIDs (`from_dict` reads it back)."""
        out: dict[str, Any] = {}
        for name in _field_names(JobView):
            value = getattr(self, name)
            if isinstance(value, ResultRow | MetricsRow):  # flat rows: no deep copy needed
                out[name] = {
                    k: _plain(getattr(value, k)) for k in _field_names(type(value)) if k != "job_id"
                }
            else:
                out[name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobView:
        """The view `to_dict` wrote; ValueError, TypeError or KeyError for anything else."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not set(data) <= set(fields):
            raise ValueError("not a job view")
        values = {k: _typed(_VIEW_TYPES.get(k), v) for k, v in data.items() if k in fields}
        values["result"] = _row(ResultRow, data.get("result"), values["id"])
        values["metrics"] = _row(MetricsRow, data.get("metrics"), values["id"])
        return cls(**values)


_VIEW_TYPES = {
    "id": uuid.UUID,
    "batch_id": uuid.UUID,
    "queued_at": datetime,
    "started_at": datetime,
    "finished_at": datetime,
    "expires_at": datetime,
    "list_cost": Decimal,
    "compute_cost": Decimal,
    "cache_savings": Decimal,
}


def _typed(kind: type | None, value: Any) -> Any:
    """A `to_dict` value back as `kind` (None stays None)."""
    if value is None or kind is None:
        return value
    if kind is datetime:
        return as_utc(datetime.fromisoformat(value))
    return kind(value)


def _row(kind: type, data: Any, job_id: uuid.UUID) -> Any:
    """A view's `result` or `metrics` row from its dict (None stays None)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("not a row")
    return kind(job_id, **{k: _typed(_VIEW_TYPES.get(k), v) for k, v in data.items()})
