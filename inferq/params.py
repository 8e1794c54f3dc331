"""What a request asks for (`SamplingParams`) and what an engine is built with (`EngineConfig`):
the one place each default is written.

A leaf: pydantic and the standard library only, no I/O. The wire schema validates a job's
`params` into `SamplingParams` and the engine samples from that very object; `Settings`
takes its engine defaults from `EngineConfig`. So the engine may import this module (and
nothing else of `inferq`), and a producer imports it without worker code or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS = 4096  # the most tokens one job may ask for
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MIN_TEMPERATURE = 1e-2  # a smaller positive temperature overflows the logits (as vLLM clamps)


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
    """How to sample. `temperature` 0 means greedy; `seed` makes sampling reproducible.
    Immutable: one object travels from the wire to the engine's sampler."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=5.0,
        description=f"0: greedy; a positive value below {MIN_TEMPERATURE} is raised to it",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: tuple[Annotated[Text, Field(max_length=MAX_STOP_CHARS)], ...] = Field(
        (), max_length=MAX_STOP_STRINGS
    )

    @field_validator("temperature")
    @classmethod
    def _clamp_temperature(cls, temperature: float) -> float:
        """0 stays greedy; 0 < t < MIN_TEMPERATURE becomes MIN_TEMPERATURE (no overflow)."""
        return MIN_TEMPERATURE if 0 < temperature < MIN_TEMPERATURE else temperature

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop


@dataclass(kw_only=True)
class EngineConfig:
    """A paged engine's knobs. The service sets them from `Settings` (whose defaults are
    these); tests and benchmarks override a few."""

    block_size: int = 16
    kv_cache_gib: float = 0.75  # KV memory in GiB; blocks follow from the model's KV shape
    kv_cache_tokens: int | None = None  # a fixed KV capacity in tokens instead (tests, benches)
    max_num_seqs: int = 64  # sequences computed at once
    max_step_tokens: int = 2048  # tokens computed per step (decodes first, then prefill chunks)
    prefill_chunk_tokens: int = 256  # most prompt tokens of one sequence prefilled per step
    aging_s: float = 5.0  # waiting this long raises a sequence one priority class
    prefix_cache: bool = True
    cache_secret: str = "inferq"  # keys the per-tenant salts (the service: random per process)
    gptq_backend: str = "auto"  # GPTQ kernel: auto picks the fastest that loads here
    native: bool = True  # CPU: the lean forward and paged attention on C kernels; False: torch
    keep_heap: bool = True  # CPU: glibc keeps freed memory for the next step (native.keep_heap)
    gptq_crossover: str = "auto"  # CPU GPTQ many-row path from: auto (measured), N rows, or off
    gptq_many: str = "auto"  # CPU GPTQ many-row path: auto (measured), fused or dense
    kernel_dir: str | None = None  # where the C kernels are built; None: ~/.cache/inferq/kernels
    # speculative decoding by prompt lookup (docs/speculative.md): tokens drafted per step
    spec_tokens: int = 4  # k, most drafted tokens verified with one decode; 0: off
    spec_ngram_max: int = 3  # n, longest n-gram of the last tokens looked up earlier
    spec_ngram_min: int = 1  # shortest n-gram that may propose a draft
    spec_max_running: int = 4  # more sequences decoding than this: no drafts in that step
    spec_min_acceptance: float = 0.3  # a sequence accepting fewer of its drafts stops drafting
