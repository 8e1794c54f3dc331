"""The wire contract: the kwargs of the `inferq.generate` Celery task, validated with pydantic.

A backend app may build this message itself and `send_task("inferq.generate", kwargs=...)`;
the worker validates the same schema on arrival.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from api_client.signing import SIGNATURE_PATTERN
from inferq.callback_urls import MAX_URL_CHARS, check_url
from inferq.params import SamplingParams, Text
from storage.records import NewJob, as_utc

MAX_INPUT_CHARS = 200_000  # a prompt, or all chat message contents together
MAX_TTL_S = 30 * 86_400
CallbackUrl = Annotated[str, Field(max_length=MAX_URL_CHARS), AfterValidator(check_url)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=MAX_INPUT_CHARS)


class JobMessage(BaseModel):
    """One generation job as it travels on the queue: exactly one of `prompt` or `messages`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    job_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    tenant: str = Field("default", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    model: Text | None = Field(None, max_length=256, description="None: the worker's default")
    prompt: Text | None = Field(None, max_length=MAX_INPUT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    params: SamplingParams = Field(default_factory=SamplingParams)
    priority: int = Field(0, ge=0, le=9, description="higher runs first")
    idempotency_key: Text | None = Field(None, min_length=1, max_length=256)
    submitted_at: datetime | None = Field(
        None,
        description="the producer's clock at enqueue; without it the time spent in the "
        "queue before a worker saw the job is unknown",
    )
    ttl_s: float | None = Field(
        None, gt=0, le=MAX_TTL_S, description="deadline, seconds after submitted_at: then expired"
    )
    callback_url: CallbackUrl | None = Field(
        None, description="a webhook when the job ends (docs/webhooks.md); syntax checked here"
    )
    signature: str | None = Field(
        None, pattern=SIGNATURE_PATTERN, description="64 lowercase hex: see api_client.signing"
    )

    @model_validator(mode="after")
    def _one_input(self) -> JobMessage:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if self.messages and sum(len(m.content) for m in self.messages) > MAX_INPUT_CHARS:
            raise ValueError(f"messages hold more than {MAX_INPUT_CHARS} characters")
        return self

    def to_job(self, default_model: str) -> NewJob:
        """The job row to store; `default_model` when the message names none."""
        return NewJob(
            id=self.job_id,
            tenant=self.tenant,
            model=self.model or default_model,
            prompt=self.prompt,
            messages=(
                [m.model_dump(mode="json") for m in self.messages]
                if self.messages is not None
                else None
            ),
            params=self.params.model_dump(mode="json"),
            priority=self.priority,
            idempotency_key=self.idempotency_key,
            queued_at=as_utc(self.submitted_at or datetime.now(UTC)),
            expires_at=self.expires_at,
            enqueued_at=self.submitted_at and as_utc(self.submitted_at),
            callback_url=self.callback_url,
        )

    @property
    def expires_at(self) -> datetime | None:
        """The deadline, when the job has one."""
        if self.ttl_s is None:
            return None
        return as_utc(self.submitted_at or datetime.now(UTC)) + timedelta(seconds=self.ttl_s)

    def to_wire(self) -> dict:
        """JSON-safe kwargs for `send_task` (`signature` only when signed, `callback_url`
        only when given: a worker from before webhooks runs jobs without one)."""
        unset = {"signature": self.signature, "callback_url": self.callback_url}
        return self.model_dump(mode="json", exclude={k for k, v in unset.items() if v is None})
