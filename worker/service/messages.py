"""Reading a queue message: Celery's protocol-2 envelope around our JSON job, or a refusal.

Nothing here raises on what a message contains: every way a message can be wrong becomes a
`Refusal` that the intake turns into a dead letter.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api_client.schema import JobMessage
from api_client.wire import TASK_NAME

JSON_TYPES = ("application/json",)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message cannot run; kept as a dead letter."""

    reason: str
    error: str = ""
    job_id: uuid.UUID | None = None


def read_job(message: Any) -> JobMessage | Refusal:
    """The validated job in a kombu message, or why there is none."""
    headers = message.headers or {}
    if message.content_type not in JSON_TYPES:
        return Refusal("non-JSON message refused", f"content type {message.content_type!r}")
    task = headers.get("task") if isinstance(headers, dict) else None
    if task != TASK_NAME:
        return Refusal("unknown task name", f"task {task!r}")
    try:
        body = json.loads(message.body)
    except (ValueError, TypeError) as exc:
        return Refusal("undecodable message", repr(exc))
    if not (
        isinstance(body, list) and len(body) == 3 and body[0] == [] and isinstance(body[1], dict)
    ):
        return Refusal("invalid task message", "body is not [[], {kwargs}, {embed}]")
    kwargs = body[1]
    try:
        return JobMessage.model_validate(kwargs)
    except ValidationError as exc:
        return Refusal("invalid job message", str(exc), _uuid_or_none(kwargs.get("job_id")))


def _uuid_or_none(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def dead_letter_payload(message: Any) -> dict[str, Any]:
    """A message's raw body (text, or base64 when not UTF-8 or holding NUL), content type and
    headers, in a form any JSON column takes."""
    body = message.body
    if not isinstance(body, bytes | str):
        body = json.dumps(body, default=str)
    raw = body.encode() if isinstance(body, str) else body
    headers = json.loads(json.dumps(message.headers or {}, default=str))
    payload: dict[str, Any] = {"content_type": message.content_type, "headers": headers}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # JSON columns take neither
        payload["body_base64"] = base64.b64encode(raw).decode()
    else:
        payload["body"] = text
    return payload
