"""OpenAI's response objects for a job: the whole answer (`chat.completion`,
`text_completion`) and its stream's chunks, built from the job's id and result."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from storage.records import ResultRow

Kind = Literal["chat", "text"]
OWNER = "inferq"


def usage(result: ResultRow) -> dict[str, Any]:
    """`usage` with `prompt_tokens_details.cached_tokens` (prompt tokens include them)."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


@dataclass(frozen=True)
class Answer:
    """One request's response objects: its id names its job."""

    kind: Kind
    job_id: uuid.UUID
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.job_id.hex}"

    def queued(self) -> dict[str, Any]:
        """The answer to `Prefer: respond-async`: the job is enqueued, not waited for."""
        return {
            "id": self.id,
            "object": "inferq.job",
            "job_id": str(self.job_id),
            "status": "queued",
            "created": self.created,
            "model": self.model,
        }

    def _object(self, chunk: bool) -> str:
        if self.kind == "text":
            return "text_completion"
        return "chat.completion.chunk" if chunk else "chat.completion"

    def _head(self, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self._object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def _choice(self, text: str | None, finish: str | None, *, delta: bool) -> dict[str, Any]:
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            body = {} if text is None else {"content": text}
            return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}

    def complete(self, result: ResultRow) -> dict[str, Any]:
        """The whole answer."""
        choice = self._choice(result.text, result.finish_reason, delta=False)
        return {**self._head(False), "choices": [choice], "usage": usage(result)}

    def chunk(
        self, text: str | None = None, finish: str | None = None, *, with_usage: bool = False
    ) -> bytes:
        """One stream chunk (`usage: null` on each when usage is asked for, as OpenAI does)."""
        body = {**self._head(True), "choices": [self._choice(text, finish, delta=True)]}
        if with_usage:
            body["usage"] = None
        return sse(body)

    def first_chunk(self, *, with_usage: bool) -> bytes:
        """A chat stream opens with the assistant's role."""
        if self.kind == "text":
            return b""
        body = {
            **self._head(True),
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        if with_usage:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, result: ResultRow) -> bytes:
        """`stream_options.include_usage`: a last chunk with no choices and the usage."""
        return sse({**self._head(True), "choices": [], "usage": usage(result)})


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}
