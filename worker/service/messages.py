"""Reading a queue message: Celery's protocol-2 envelope around our JSON job, or a refusal.

Nothing here raises on what a message contains: every way a message can be wrong becomes a
`Refusal` that the intake turns into a dead letter.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api_client.schema import JobMessage
from api_client.signing import verify
from api_client.wire import TASK_NAME

JSON_TYPES = ("application/json",)
MAX_MESSAGE_BYTES = 1 << 20  # a job message's body; larger ones are refused unread
MAX_KEPT_BYTES = 64 << 10  # of a dead letter's body and headers


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message cannot run; kept as a dead letter."""

    reason: str
    error: str = ""
    job_id: uuid.UUID | None = None


def read_job(message: Any, keys: dict[str, str]) -> JobMessage | Refusal:
    """The validated job in a kombu message, or why there is none; a tenant with a signing
    key in `keys` must have signed it."""
    headers = message.headers or {}
    if message.content_type not in JSON_TYPES:
        return Refusal("non-JSON message refused", f"content type {message.content_type!r}")
    task = headers.get("task") if isinstance(headers, dict) else None
    if task != TASK_NAME:
        return Refusal("unknown task name", f"task {task!r}")
    if len(message.body) > MAX_MESSAGE_BYTES:
        return Refusal("message too large", f"{len(message.body)} bytes; the limit is "
                       f"{MAX_MESSAGE_BYTES}")  # fmt: skip
    try:
        body = json.loads(message.body)
    except (ValueError, TypeError) as exc:
        return Refusal("undecodable message", repr(exc))
    if not (
        isinstance(body, list) and len(body) == 3 and body[0] == [] and isinstance(body[1], dict)
    ):
        return Refusal("invalid task message", "body is not [[], {kwargs}, {embed}]")
    kwargs = body[1]
    job_id = _uuid_or_none(kwargs.get("job_id"))
    try:
        job = JobMessage.model_validate(kwargs)
    except ValidationError as exc:
        return Refusal("invalid job message", str(exc), job_id)
    key = keys.get(job.tenant)
    if key is not None and not verify(kwargs, key):
        return Refusal("bad signature", f"tenant {job.tenant!r} requires a valid signature", job_id)
    return job


def _uuid_or_none(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def dead_letter_payload(message: Any) -> dict[str, Any]:
    """A message as a dead letter keeps it: its body's first 64 KB (text, or base64 when not
    UTF-8 or holding NUL), the body's size and SHA-256, the content type and the headers (as
    printable text, cut at 64 KB), in a form any JSON column takes."""
    raw = (
        message.body.encode("utf-8", "surrogatepass")
        if isinstance(message.body, str)
        else (bytes(message.body))
    )
    head = raw[:MAX_KEPT_BYTES]
    headers = json.dumps(message.headers or {}, default=str, ensure_ascii=True)
    payload: dict[str, Any] = {
        "content_type": _printable(str(message.content_type)),
        "headers": headers[:MAX_KEPT_BYTES],  # ASCII JSON text: NUL and surrogates escaped
        "size": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "truncated": len(raw) > len(head),
    }
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # JSON columns take neither
        payload["body_base64"] = base64.b64encode(head).decode()
    else:
        payload["body"] = text
    return payload


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
