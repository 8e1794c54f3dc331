"""What `InferqClient` and `AsyncInferqClient` share: validating and sending jobs (through
the broker only), job ids, and reading a job's state from its result key. Their waits, cancels
and streams are plans in `api_client.plans`, which each client runs its own way.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from pydantic import ValidationError

from api_client.results import RESULT_PREFIX, from_meta
from api_client.schema import JobMessage, SamplingParams
from api_client.wire import producer_app, send_job
from inferq.settings import Settings, get_settings
from storage.records import JobView

IDEMPOTENCY_SECRET = "inferq idempotency key"  # for tenants without a signing key


class InvalidJobError(ValueError):
    """A job was refused before anything was enqueued."""

    def __init__(self, error: ValidationError | str):
        if isinstance(error, ValidationError):
            parts = [f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in error.errors()]
            error = "invalid job: " + "; ".join(parts)
        super().__init__(error)


class ResultsUnavailable(RuntimeError):
    """Results come through Redis: the broker (or INFERQ_RESULT_BACKEND_URL) is not Redis."""


def idempotent_job_id(tenant: str, idempotency_key: str, key: str | None) -> uuid.UUID:
    """The job id of a tenant's idempotency key: the same key gives the same job (so a repeat
    is the same job, and waits on its result) with no lookup. Keyed by the tenant's signing
    key when it has one (nobody else can tell the id from the key); else anyone who knows the
    tenant and the key can (docs/security.md)."""
    secret = (key or IDEMPOTENCY_SECRET).encode()
    mac = hmac.new(secret, f"{tenant}\0{idempotency_key}".encode(), hashlib.sha256).digest()
    return uuid.UUID(bytes=mac[:16], version=4)


def job_id_of(key: bytes | str) -> uuid.UUID | None:
    """The job id of a result key (or its channel); None for another name."""
    name = key.decode(errors="replace") if isinstance(key, bytes) else key
    try:
        return (
            uuid.UUID(name.removeprefix(RESULT_PREFIX)) if name.startswith(RESULT_PREFIX) else None
        )
    except ValueError:
        return None


def tenant_view(raw: bytes | str | None, job_id: uuid.UUID, tenant: str) -> JobView | None:
    """The state a result key holds for a job of `tenant` (None: none, not ours, or not a
    job's: a job of another tenant is not shown, as if it did not exist)."""
    view = from_meta(raw, job_id)
    return view if view is not None and view.tenant == tenant else None


class Producer:
    """Submit jobs as one tenant through the broker only. Settings come from `INFERQ_*`
    (broker, queue, default model, `INFERQ_TENANT` and its signing key `INFERQ_TENANT_KEY`)
    unless given; no database URL is needed."""

    def __init__(
        self, settings: Settings | None = None, tenant: str | None = None, key: str | None = None
    ):
        self.settings = settings or get_settings()
        self.tenant = tenant or self.settings.tenant
        self.key = key if tenant else (key or self.settings.tenant_key)
        self.celery: Celery = producer_app(self.settings)
        self.poll_s = self.settings.result_poll_s
        self._reply_to = str(uuid.uuid4())  # the name a Celery producer gives itself (unused)

    @property
    def result_url(self) -> str:
        url = self.settings.resolved_result_url
        if url is None:
            raise ResultsUnavailable(
                "results, streams and cancels go through Redis: set INFERQ_BROKER_URL (or "
                "INFERQ_RESULT_BACKEND_URL) to a redis:// URL"
            )
        return url

    def build(
        self,
        prompt: str | None = None,
        *,
        messages: list[Mapping[str, str]] | None = None,
        params: SamplingParams | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        model: str | None = None,
        ttl_s: float | None = None,
        callback_url: str | None = None,
    ) -> JobMessage:
        """Validate a job without sending it; raises InvalidJobError. A job with an
        idempotency key gets that key's job id (`idempotent_job_id`). A `callback_url` is
        also checked against this client's `INFERQ_WEBHOOK_ALLOW` (without DNS: the worker
        checks again, with it, at every attempt; docs/webhooks.md)."""
        refused = callback_url and self.settings.webhook_policy().url_refusal(callback_url)
        if refused:
            raise InvalidJobError(f"invalid job: callback_url: {refused}")
        try:
            job = JobMessage(
                prompt=prompt,
                messages=messages,
                params=params if params is not None else SamplingParams(),
                tenant=self.tenant,
                idempotency_key=idempotency_key,
                priority=priority,
                model=model or self.settings.model,
                ttl_s=ttl_s,
                submitted_at=datetime.now(UTC),
                callback_url=callback_url,
            )
        except ValidationError as exc:
            raise InvalidJobError(exc) from None
        if idempotency_key is None:
            return job
        job_id = idempotent_job_id(self.tenant, idempotency_key, self.key)
        return job.model_copy(update={"job_id": job_id})

    def build_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[JobMessage]:
        """Every job validated (InvalidJobError for the first bad one, nothing sent)."""
        return [self.build(**dict(job)) for job in jobs]

    def enqueue(self, msg: JobMessage) -> uuid.UUID:
        """Send a validated job; its id. A repeated idempotency key sends the same job again:
        the worker runs it once (other content under the same key is refused, as a dead
        letter `job id taken`, and the first job carries on)."""
        send_job(self.celery, self.settings.queue, msg, self.key)
        return msg.job_id
