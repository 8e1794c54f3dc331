"""The seam between the worker and an inference engine.

An engine takes prompt token ids plus sampling params and returns tokens, a finish reason
and timings. The HF `generate`-style padded engine implements it today; the paged,
prefix-cached engine implements the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from api_client.schema import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class EngineRequest:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str = ""  # per-tenant; prefix caches never share blocks across salts


@dataclass
class EngineOutput:
    seq_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int = 0
    first_token_s: float = 0.0  # from batch start to the first generated token
    decode_s: float = 0.0  # from the first token to the last


@dataclass
class BatchStats:
    size: int
    real_tokens: int  # token positions the model had to compute: prompts + fed-back tokens
    padded_tokens: int  # token slots computed, padding included
    duration_s: float
    extra: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    model_name: str

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages rendered with the chat template."""
        ...

    def generate(self, requests: list[EngineRequest]) -> tuple[list[EngineOutput], BatchStats]:
        """Run one batch; outputs in the order of `requests`."""
        ...


@runtime_checkable
class StreamingEngine(Engine, Protocol):
    """An engine that sequences join and leave between steps (continuous batching)."""

    @property
    def has_work(self) -> bool: ...

    def add(self, request: EngineRequest, priority: int = 0) -> None:
        """Queue a sequence; ValueError if it can never run here."""
        ...

    def step(self) -> list[EngineOutput]:
        """Advance every running sequence by one token; return those that finished."""
        ...

    def abort(self, seq_id: str) -> None: ...
