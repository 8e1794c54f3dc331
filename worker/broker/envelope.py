"""Reading a broker message's envelope: kombu's JSON envelope (as Redis lists keep it) as a
`Received`, the size limits a message is read under, and a message as a dead letter keeps it
(whatever it holds: nothing here raises on content).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from worker.broker.source import Received

MAX_MESSAGE_BYTES = 1 << 20  # a job message's body; larger ones are refused unread
MAX_KEPT_BYTES = 64 << 10  # of a dead letter's body and headers
MAX_RAW_BYTES = 2 * MAX_MESSAGE_BYTES  # a queued item (base64 body + envelope) read at all


def unwrap(envelope: dict[str, Any], handle: Any) -> Received:
    """A kombu envelope (as kept in Redis lists) as a `Received`; KeyError/TypeError/ValueError
    when it is not one."""
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body, validate=True)
    headers = envelope.get("headers") or {}
    return Received(body, envelope.get("content-type"), headers, handle)


def raw_body(message: Any) -> bytes:
    """A message's body as the bytes it arrived as."""
    body = message.body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    return bytes(body) if isinstance(body, bytes | bytearray) else repr(type(body)).encode()


def dead_letter_payload(message: Any) -> dict[str, Any]:
    """A message as a dead letter keeps it: its body's first 64 KB (text, or base64 when not
    UTF-8 or holding NUL), the body's size and SHA-256, the content type and the headers (as
    printable text, cut at 64 KB), in a form any JSON column takes. An item too large to read
    keeps its head, its size as queued and its SHA-1 (`sha1`) instead."""
    raw = raw_body(message)
    head = raw[:MAX_KEPT_BYTES]
    try:
        headers = json.dumps(message.headers or {}, default=str, ensure_ascii=True)
    except (ValueError, TypeError, RecursionError):  # nested too deep to write back
        headers = json.dumps({"unwritable": type(message.headers).__name__})
    payload: dict[str, Any] = {
        "content_type": _printable(str(message.content_type)),
        "headers": headers[:MAX_KEPT_BYTES],  # ASCII JSON text: NUL and surrogates escaped
        "size": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "truncated": len(raw) > len(head),
    }
    oversized = getattr(message, "oversized", None)
    if oversized:
        del payload["sha256"]
        payload.update(size=oversized[0], sha1=oversized[1], truncated=True)
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


def sender(message: Received) -> str:
    """Who the message says sent it: Celery's `origin` header (the producer's host), cut."""
    origin = message.headers.get("origin") if isinstance(message.headers, dict) else None
    if not isinstance(origin, str) or not origin:
        return "unknown"
    return origin[:64].encode("ascii", "backslashreplace").decode().replace("\x00", "\\x00")
