"""The engine's public types: what goes into an engine and what comes out. No torch here.

The service (intake, engine loop, result sink) talks to an engine only through these types
and the `Engine` protocol; everything with tensors stays behind it. `SamplingParams` is the
wire's own class (`inferq.params`, a leaf): a job's params reach the sampler as validated.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, Self, TypeAlias, runtime_checkable

from inferq.params import SamplingParams


class FinishReason(StrEnum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    ERROR = "error"  # the sequence failed alone (see `EngineOutput.error`); the others go on


#: A sequence's key: the service passes its job's UUID; tests and benchmarks use strings.
#: Hashable, and ordered among one engine's ids (the scheduler breaks ties by it).
SeqId: TypeAlias = Hashable


class Job(Protocol):
    """What `EngineRequest.from_job` reads of a job (the wire's `JobMessage` has it)."""

    @property
    def job_id(self) -> SeqId: ...

    @property
    def params(self) -> SamplingParams: ...

    @property
    def tenant(self) -> str: ...

    @property
    def priority(self) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineRequest:
    seq_id: SeqId
    prompt_ids: list[int]
    params: SamplingParams  # the job's own object, as the wire validated it
    tenant: str = ""  # prefix-cache isolation: blocks are never shared across tenants
    priority: int = 0  # higher runs first (ages up while waiting)
    ignore_eos: bool = False  # run to max_tokens whatever is sampled (equal-work benchmarks)
    stream: bool = False  # hand out the text as it is generated (`Engine.deltas`)

    @classmethod
    def from_job(cls, job: Job, prompt_ids: list[int], **more: Any) -> Self:
        """The request that runs `job` on `prompt_ids`, every field mapped by name (`more`:
        a subclass's own fields)."""
        return cls(
            seq_id=job.job_id,
            prompt_ids=prompt_ids,
            params=job.params,
            tenant=job.tenant,
            priority=job.priority,
            **more,
        )


@dataclass(slots=True)
class EngineOutput:
    """A finished sequence (or, with `error`, a failed one). Times are `time.time()` seconds
    (wall clock, comparable to UTC)."""

    seq_id: SeqId
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (at the last admission)
    computed_tokens: int  # tokens this sequence had computed (prefill, recompute, decode)
    computed_prompt_tokens: int  # of those, prefill tokens (uncached, plus recompute)
    compute_s: float  # its share of the engine steps that computed it (by tokens computed)
    batch: int  # the engine step that first admitted it: jobs admitted together share it
    batch_size: int  # how many sequences that step admitted
    added_at: float
    admitted_at: float
    first_token_at: float
    finished_at: float
    error: str | None = None  # set: the sequence failed (finish_reason ERROR), no result
    draft_tokens: int = 0  # speculative tokens drafted for it and verified
    accepted_tokens: int = 0  # of those, the ones kept (each saved a decode step)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Text a streaming sequence added in one step: `start` characters of its text came
    before it; `end`, on its last piece, is the finish reason. Joined, a sequence's pieces
    are its output's text."""

    seq_id: SeqId
    start: int
    text: str
    end: str | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters since the engine was built, and the KV pool's occupancy now."""

    steps: int = 0
    running: int = 0
    waiting: int = 0
    seq_steps: int = 0  # sequences sampled, summed over steps (= tokens sampled)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    recompute_tokens: int = 0  # prefill of sequences preempted before
    draft_tokens: int = 0  # speculative tokens verified beside decodes (docs/speculative.md)
    accepted_tokens: int = 0  # of those, the ones the model agreed with (in decode_tokens)
    busy_s: float = 0.0  # wall time spent inside step(): the sum of every sequence's compute_s
    cache_queried_tokens: int = 0
    cache_hit_tokens: int = 0
    blocks_used: int = 0
    blocks_free: int = 0
    blocks_evictable: int = 0
    evictions: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def computed_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def hit_rate(self) -> float:
        q = self.cache_queried_tokens
        return self.cache_hit_tokens / q if q else 0.0


class Codec(Protocol):
    """Text <-> token ids for one model. Not thread-safe: each thread owns its own."""

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


@runtime_checkable
class Engine(Protocol):
    """Continuous batching: sequences join (`add`) and leave (finished, or `abort`) between
    steps. One thread owns an engine; nothing here does I/O."""

    model_name: str
    device_class: str  # what compute rates are set for: "cpu", "cuda:<device name>"
    max_context: int  # prompt + max_tokens must fit
    max_num_seqs: int  # sequences computed at once

    @property
    def has_work(self) -> bool: ...

    def new_codec(self) -> Codec:
        """A tokenizer of this engine's model for another thread to own."""
        ...

    def add(self, request: EngineRequest) -> None:
        """Queue a sequence; ValueError if it can never run here (duplicate id, too long)."""
        ...

    def step(self) -> list[EngineOutput]:
        """One scheduling step and forward pass; the sequences that finished in it."""
        ...

    def abort(self, seq_id: SeqId) -> float:
        """Drop a waiting or running sequence; the compute seconds it had used (0.0 for an
        unknown id)."""
        ...

    def deltas(self) -> list[TextDelta]:
        """The text the last `step` added, per streaming sequence (`EngineRequest.stream`)."""
        ...

    def stats(self) -> EngineStats: ...


def run_to_completion(engine: Engine, requests: list[EngineRequest]) -> list[EngineOutput]:
    """Run a closed set of requests to the end (outputs in request order): a thin helper over
    `add`/`step` for benchmarks and tests. On an error the unfinished ones are aborted."""
    wanted = {r.seq_id for r in requests}
    results: dict[SeqId, EngineOutput] = {}
    try:
        for r in requests:
            engine.add(r)
        while wanted - results.keys():
            for out in engine.step():
                results[out.seq_id] = out
    except BaseException:
        for seq_id in wanted - results.keys():
            engine.abort(seq_id)
        raise
    return [results[r.seq_id] for r in requests]
