"""Per-tenant message signatures: HMAC-SHA256 with the tenant's key over the job's kwargs
(canonical JSON, the `signature` field left out). A worker that knows a tenant's keys refuses
that tenant's unsigned, badly signed or stale messages, so nobody can pose as the tenant (and
get its prefix-cache hits); a signature is 64 lowercase hex characters."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

SIGNATURE = "signature"
SIGNATURE_PATTERN = r"^[0-9a-f]{64}$"
_HEX64 = re.compile(SIGNATURE_PATTERN)


def _canonical(kwargs: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in kwargs.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(kwargs: Mapping[str, Any], key: str) -> str:
    """The signature of a job's wire kwargs."""
    return _mac(_canonical(kwargs), key)


def signed(kwargs: dict[str, Any], key: str | None) -> dict[str, Any]:
    """`kwargs` with their signature for `key` (as they are when there is no key)."""
    return {**kwargs, SIGNATURE: sign(kwargs, key)} if key else kwargs


def verify(kwargs: Mapping[str, Any], keys: Iterable[str]) -> bool:
    """Whether `kwargs` carries a valid signature for one of `keys` (several during a key
    rotation); never raises on what `kwargs` holds."""
    given = kwargs.get(SIGNATURE)
    if not isinstance(given, str) or _HEX64.fullmatch(given) is None:
        return False
    try:
        body = _canonical(kwargs)
    except (TypeError, ValueError, RecursionError):  # not JSON: nothing could have signed it
        return False
    return any(hmac.compare_digest(given, _mac(body, key)) for key in keys)


def _mac(body: bytes, key: str) -> str:
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
