"""The client a backend app imports: validate, record, enqueue; then read results back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from pydantic import ValidationError

from api_client.schema import JobMessage, SamplingParams
from api_client.signing import SIGNATURE, sign
from api_client.wire import TASK_NAME, celery_priority, producer_app
from inferq.settings import Settings, get_settings
from storage.records import TERMINAL_STATUSES, JobView
from storage.repository import Repository


class InvalidJobError(ValueError):
    """A job was refused before anything was enqueued."""

    def __init__(self, error: ValidationError | str):
        if isinstance(error, ValidationError):
            parts = [f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in error.errors()]
            error = "invalid job: " + "; ".join(parts)
        super().__init__(error)


class InferqClient:
    """Submit generation jobs and read their status, results and metrics, as one tenant.

    Settings come from `INFERQ_*` (broker, database, queue, default model, `INFERQ_TENANT`
    and its signing key `INFERQ_TENANT_KEY`) unless given. Reads and cancels see only this
    tenant's jobs; idempotency keys are per tenant.
    """

    def __init__(
        self, settings: Settings | None = None, tenant: str | None = None, key: str | None = None
    ):
        self.settings = settings or get_settings()
        self.tenant = tenant or self.settings.tenant
        self.key = key if tenant else (key or self.settings.tenant_key)
        self.repo = Repository(self.settings.resolved_database_url)
        self.celery: Celery = producer_app(self.settings)

    def for_tenant(self, tenant: str, key: str | None = None) -> InferqClient:
        """A client for another tenant on the same broker and database."""
        return InferqClient(self.settings, tenant, key)

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
    ) -> JobMessage:
        """Validate a job without sending it; raises InvalidJobError."""
        try:
            return JobMessage(
                prompt=prompt,
                messages=messages,
                params=params if params is not None else SamplingParams(),
                tenant=self.tenant,
                idempotency_key=idempotency_key,
                priority=priority,
                model=model or self.settings.model,
                ttl_s=ttl_s,
                submitted_at=datetime.now(UTC),
            )
        except ValidationError as exc:
            raise InvalidJobError(exc) from None

    def submit(self, prompt: str | None = None, **job: Any) -> uuid.UUID:
        """Enqueue one job and return its id (the existing id for a repeated idempotency key)."""
        return self.enqueue(self.build(prompt, **job))

    def submit_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[uuid.UUID]:
        """Validate every job first (nothing is enqueued if one is invalid), then enqueue all."""
        messages = [self.build(**dict(job)) for job in jobs]
        return [self.enqueue(msg) for msg in messages]

    def enqueue(self, msg: JobMessage) -> uuid.UUID:
        job_id, created = self.repo.submit(msg.to_job(self.settings.model))
        if not created:
            return job_id
        kwargs = msg.to_wire()
        if self.key:
            kwargs[SIGNATURE] = sign(kwargs, self.key)
        try:
            self.celery.send_task(
                TASK_NAME,
                kwargs=kwargs,
                queue=self.settings.queue,
                priority=celery_priority(msg.priority),
                task_id=str(job_id),
            )
        except Exception as exc:
            self.repo.fail_jobs({job_id: f"enqueue failed: {exc!r}"}, final=True)
            raise
        return job_id

    def get(self, job_id: uuid.UUID | str) -> JobView | None:
        return self.repo.get(uuid.UUID(str(job_id)), self.tenant)

    def wait(self, job_id: uuid.UUID | str, timeout: float = 60.0, poll: float = 0.1) -> JobView:
        """Block until the job is done, failed or cancelled; TimeoutError otherwise."""
        return self.wait_many([job_id], timeout, poll)[0]

    def wait_many(
        self, job_ids: Iterable[uuid.UUID | str], timeout: float = 300.0, poll: float = 0.1
    ) -> list[JobView]:
        ids = [uuid.UUID(str(j)) for j in job_ids]
        deadline = time.monotonic() + timeout
        while True:
            views = self.repo.get_many(ids, self.tenant)
            if all(i in views and views[i].status in TERMINAL_STATUSES for i in ids):
                return [views[i] for i in ids]
            if time.monotonic() > deadline:
                waiting = sum(
                    1 for i in ids if i not in views or views[i].status not in TERMINAL_STATUSES
                )
                raise TimeoutError(f"{waiting} of {len(ids)} jobs not finished after {timeout}s")
            time.sleep(poll)

    def cancel(self, job_id: uuid.UUID | str) -> bool:
        """Cancel a queued or running job; True if it had not finished. A worker drops a
        running job within about half a second (its result, if one races in, is not kept as
        the outcome: the job stays cancelled)."""
        return self.repo.cancel(uuid.UUID(str(job_id)), self.tenant)
