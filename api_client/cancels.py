"""Cancel requests: what a producer adds to a job's cancel set (`inferq:cancel:<job id>`), and
the rule a worker applies before it cancels anything. No I/O here.

A request is JSON `{"job_id", "tenant", "signature"}`: the tenant it speaks for, signed with
that tenant's key (HMAC-SHA256 over `{"cancel": job id, "tenant": tenant}` as canonical JSON)
when the producer has one. Celery's `app.control.revoke(id)` carries neither: a worker records
it as a request with tenant None. Whatever a request says, it can only cancel, and only:

- a job of a tenant with signing keys: when it names that tenant and is signed with one of
  its keys (a revoke never cancels such a job);
- a job of a tenant without keys (whose name anyone may assert, see docs/security.md): when it
  names that tenant, or is a revoke (which, like Celery's, names only the job) — unless the
  worker requires signatures (`INFERQ_REQUIRE_SIGNATURE`), when no unsigned request cancels.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from api_client.signing import SIGNATURE, sign, verify

MAX_REQUEST_BYTES = 1024  # a larger member of a cancel set is ignored
MAX_REQUESTS = 64  # members of one job's cancel set a worker reads


@dataclass(frozen=True, slots=True)
class CancelRequest:
    job_id: uuid.UUID
    tenant: str | None  # None: Celery's revoke, which names only the job
    signature: str | None = None

    def signed_fields(self) -> dict[str, str | None]:
        return {"cancel": str(self.job_id), "tenant": self.tenant}

    def encode(self) -> str:
        body = {"job_id": str(self.job_id), "tenant": self.tenant}
        if self.signature is not None:
            body[SIGNATURE] = self.signature
        return json.dumps(body, separators=(",", ":"), sort_keys=True)


def request(job_id: uuid.UUID, tenant: str | None, key: str | None = None) -> CancelRequest:
    """A request to cancel `job_id` as `tenant` (signed with `key`, when given)."""
    unsigned = CancelRequest(job_id, tenant)
    signature = sign(unsigned.signed_fields(), key) if key and tenant else None
    return CancelRequest(job_id, tenant, signature)


def parse(raw: bytes | str, job_id: uuid.UUID) -> CancelRequest | None:
    """A member of `job_id`'s cancel set as a request, or None (malformed, too large, about
    another job). Never raises on what it holds."""
    if len(raw) > MAX_REQUEST_BYTES:
        return None
    try:
        body = json.loads(raw)
        tenant, signature = body.get("tenant"), body.get(SIGNATURE)
        if uuid.UUID(body["job_id"]) != job_id:
            return None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    if not isinstance(tenant, str | None) or not isinstance(signature, str | None):
        return None
    return CancelRequest(job_id, tenant, signature)


def allowed(
    req: CancelRequest,
    job_tenant: str,
    keys: Mapping[str, Iterable[str]],
    require_signature: bool = False,
) -> bool:
    """Whether `req` may cancel a job of `job_tenant` (the module docstring's rule)."""
    tenant_keys = tuple(keys.get(job_tenant, ()))
    if tenant_keys:
        fields = {**req.signed_fields(), SIGNATURE: req.signature}
        return req.tenant == job_tenant and verify(fields, tenant_keys)
    if require_signature:
        return False
    return req.tenant is None or req.tenant == job_tenant
