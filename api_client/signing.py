"""Per-tenant message signatures: HMAC-SHA256 with the tenant's key over the job's kwargs
(canonical JSON, the `signature` field left out). A worker that knows a tenant's key refuses
that tenant's unsigned or badly signed messages, so nobody can pose as the tenant (and get
its prefix-cache hits)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

SIGNATURE = "signature"


def _canonical(kwargs: dict[str, Any]) -> bytes:
    body = {k: v for k, v in kwargs.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(kwargs: dict[str, Any], key: str) -> str:
    """The signature of a job's wire kwargs."""
    return hmac.new(key.encode(), _canonical(kwargs), hashlib.sha256).hexdigest()


def verify(kwargs: dict[str, Any], key: str) -> bool:
    """Whether `kwargs` carries a valid signature for `key`."""
    given = kwargs.get(SIGNATURE)
    return isinstance(given, str) and hmac.compare_digest(given, sign(kwargs, key))
