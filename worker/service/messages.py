"""Reading a queue message: Celery's protocol-2 envelope around our JSON job, or a refusal.

Nothing here raises on what a message contains: every way a message can be wrong becomes a
`Refusal` that the intake turns into a dead letter.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from api_client.schema import JobMessage
from api_client.signing import verify
from api_client.wire import TASK_NAME
from inferq.settings import Settings
from storage.records import as_utc
from worker.broker import MAX_MESSAGE_BYTES, MAX_RAW_BYTES

JSON_TYPES = ("application/json",)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message cannot run; kept as a dead letter."""

    reason: str
    error: str = ""
    job_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class Trust:
    """Who must sign: each keyed tenant with one of its keys (several during a rotation), every
    tenant when `require_signature`, with a `submitted_at` within `window` of the worker's
    clock."""

    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    require_signature: bool = False
    window: timedelta = timedelta(minutes=5)

    @classmethod
    def of(cls, settings: Settings) -> Trust:
        window = timedelta(seconds=settings.signature_window_s)
        return cls(settings.signing_keys(), settings.require_signature, window)


def read_job(message: Any, trust: Trust, now: datetime) -> JobMessage | Refusal:
    """The validated job in a kombu message, or why there is none. A message without a
    `job_id` takes the Celery task id (so a replay is the same job); a keyed tenant's message
    must be signed with one of its keys and sent within `trust.window` of `now`."""
    oversized = getattr(message, "oversized", None)
    if oversized:  # never read: the source handed over only its head
        return Refusal(
            "message too large", f"{oversized[0]} bytes as queued; the limit is {MAX_RAW_BYTES}"
        )
    headers = message.headers if isinstance(message.headers, dict) else {}
    if message.content_type not in JSON_TYPES:
        return Refusal("non-JSON message refused", f"content type {_shown(message.content_type)}")
    if not isinstance(message.body, str | bytes):
        return Refusal("undecodable message", f"a body {_shown(message.body)}")
    task = headers.get("task")
    if task != TASK_NAME:
        return Refusal("unknown task name", f"task {_shown(task)}")
    if len(message.body) > MAX_MESSAGE_BYTES:
        return Refusal(
            "message too large", f"{len(message.body)} bytes; the limit is {MAX_MESSAGE_BYTES}"
        )
    try:
        body = json.loads(message.body)
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        return Refusal("undecodable message", repr(exc))
    if not (
        isinstance(body, list) and len(body) == 3 and body[0] == [] and isinstance(body[1], dict)
    ):
        return Refusal("invalid task message", "body is not [[], {kwargs}, {embed}]")
    kwargs = body[1]
    fields = kwargs
    task_id = uuid_or_none(headers.get("id"))
    if "job_id" not in kwargs and task_id is not None:
        fields = {**kwargs, "job_id": str(task_id)}
    job_id = uuid_or_none(fields.get("job_id"))
    try:
        job = JobMessage.model_validate(fields)
    except ValidationError as exc:
        return Refusal("invalid job message", str(exc), job_id)
    return _trusted(job, kwargs, trust, now)


def _trusted(
    job: JobMessage, kwargs: dict[str, Any], trust: Trust, now: datetime
) -> JobMessage | Refusal:
    """The job, if its tenant's keys and the clock allow it."""
    keys = trust.keys.get(job.tenant)
    if not keys:
        if trust.require_signature:
            return Refusal(
                "unsigned tenant", f"tenant {job.tenant!r} has no signing key here", job.job_id
            )
        return job
    if not verify(kwargs, keys):
        return Refusal(
            "bad signature", f"tenant {job.tenant!r} requires a valid signature", job.job_id
        )
    if "job_id" not in kwargs:  # else a replay under a new task id would be a new job
        return Refusal(
            "bad signature",
            "a signed message must carry its job_id in the signed kwargs",
            job.job_id,
        )
    sent = job.submitted_at and as_utc(job.submitted_at)
    if sent is None or abs(now - sent) > trust.window:
        window = trust.window.total_seconds()
        error = f"a signed message must carry a submitted_at within {window:g} s of now"
        return Refusal("stale signature", error, job.job_id)
    return job


def _shown(value: object) -> str:
    """A header value for an error text: a string quoted (cut at 128), else its type."""
    if value is None or isinstance(value, str):
        return repr(value and value[:128])
    return f"of type {type(value).__name__}"


def uuid_or_none(value: object) -> uuid.UUID | None:
    """A UUID from an untrusted value: a string of at most 64 characters, else None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
