"""The wire contract: the kwargs of the `inferq.generate` Celery task, validated with pydantic.

A backend app may build this message itself and `send_task("inferq.generate", kwargs=...)`;
the worker validates the same schema on arrival.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from storage.records import NewJob, as_utc

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_INPUT_CHARS = 200_000  # a prompt, or all chat message contents together
MAX_TTL_S = 30 * 86_400


def _storable(text: str) -> str:
    """Refuse text a database cannot store as sent: NUL characters, lone surrogates."""
    if "\x00" in text:
        raise ValueError("text must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(_storable)]


class SamplingParams(BaseModel):
    """How to sample. `temperature` 0 means greedy; `seed` makes sampling reproducible."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop


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
    signature: str | None = Field(None, max_length=128, description="see api_client.signing")

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
        )

    @property
    def expires_at(self) -> datetime | None:
        """The deadline, when the job has one."""
        if self.ttl_s is None:
            return None
        return as_utc(self.submitted_at or datetime.now(UTC)) + timedelta(seconds=self.ttl_s)

    def to_wire(self) -> dict:
        """JSON-safe kwargs for `send_task` (`signature` only when signed)."""
        return self.model_dump(
            mode="json", exclude={"signature"} if self.signature is None else None
        )
