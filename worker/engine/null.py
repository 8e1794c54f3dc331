"""A model-free engine for service tests and the service benchmark's null mode: every queued
sequence finishes in the next step with `max_tokens` copies of one token. No torch."""

from __future__ import annotations

import time

from worker.engine.api import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    SeqId,
    TextDelta,
)
from worker.engine.counters import StepCounters

NULL_TOKEN = 32  # the token every null sequence generates (b" " in `ByteCodec`)


class ByteCodec:
    """UTF-8 bytes as token ids: a prompt's bytes, or the messages' contents joined by
    newlines; decoding maps bytes back (invalid sequences replaced)."""

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        text = "\n".join(str(m.get("content", "")) for m in messages) if messages else prompt
        return list((text or "").encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t & 0xFF for t in token_ids).decode("utf-8", errors="replace")


class NullEngine:
    """`api.Engine` without a model: `step` finishes everything queued at once."""

    def __init__(self, model_name: str = "null", max_num_seqs: int = 256) -> None:
        self.model_name = model_name
        self.device_class = "cpu"
        self.max_context = 1 << 20
        self.max_num_seqs = max_num_seqs
        self._queued: dict[SeqId, tuple[EngineRequest, float]] = {}
        self.counters = StepCounters()

    @property
    def has_work(self) -> bool:
        return bool(self._queued)

    def new_codec(self) -> ByteCodec:
        return ByteCodec()

    def add(self, request: EngineRequest) -> None:
        if request.seq_id in self._queued:
            raise ValueError(f"duplicate seq_id {request.seq_id!r}")
        if not request.prompt_ids:
            raise ValueError(f"seq {request.seq_id!r}: empty prompt")
        if request.params.max_tokens < 1:
            raise ValueError(f"seq {request.seq_id!r}: max_tokens must be >= 1")
        if len(request.prompt_ids) + request.params.max_tokens > self.max_context:
            raise ValueError(f"seq {request.seq_id!r}: prompt + max_tokens > max_context")
        self._queued[request.seq_id] = (request, time.time())

    def abort(self, seq_id: SeqId) -> float:
        self._queued.pop(seq_id, None)
        return 0.0  # nothing is computed before the step that finishes it

    def step(self) -> list[EngineOutput]:
        """Finish every queued sequence, in the order they were added."""
        started = time.perf_counter()
        if not self._queued:
            return []
        batch, self._queued = list(self._queued.values()), {}
        counters, now = self.counters, time.time()
        outputs = []
        for request, added_at in batch:
            prompt, n = len(request.prompt_ids), request.params.max_tokens
            counters.prefill_tokens += prompt
            counters.decode_tokens += n - 1
            outputs.append(
                EngineOutput(
                    seq_id=request.seq_id,
                    token_ids=[NULL_TOKEN] * n,
                    text="",
                    finish_reason=FinishReason.LENGTH,
                    prompt_tokens=prompt,
                    cached_tokens=0,
                    computed_tokens=prompt + n - 1,
                    computed_prompt_tokens=prompt,
                    compute_s=0.0,
                    batch=counters.steps + 1,
                    batch_size=len(batch),
                    added_at=added_at,
                    admitted_at=now,
                    first_token_at=now,
                    finished_at=now,
                )
            )
        counters.charge(time.perf_counter() - started, [(o, o.computed_tokens) for o in outputs])
        return outputs

    def deltas(self) -> list[TextDelta]:
        return []  # its text is empty: nothing to stream

    def stats(self) -> EngineStats:
        return EngineStats(waiting=len(self._queued), **self.counters.figures())
