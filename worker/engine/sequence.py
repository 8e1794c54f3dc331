"""The engine's sequence: the scheduler's `Sequence` plus sampling, stop strings (watched
incrementally, `detokenizer.StopWatch`), finish reason and timings, on one object per request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from scheduler import Sequence
from worker.engine.api import EngineOutput, EngineRequest, FinishReason, SamplingParams, TextDelta
from worker.engine.codec import TextCodec
from worker.engine.detokenizer import (
    IncrementalDetokenizer,
    StopWatch,
    TextStream,
    find_stop,
    stop_margin,
)
from worker.engine.sampling import make_generator


@dataclass(eq=False, kw_only=True)
class EngineSequence(Sequence):
    """A request being generated. `append` decides when it is finished: an eos token (not
    kept), a stop string (the text is cut before it) or max_tokens."""

    params: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False  # run to max_tokens whatever is sampled
    codec: TextCodec | None = None
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None  # with stop strings or streaming
    stops: StopWatch | None = None  # watches the text when the request has stop strings
    stream: TextStream | None = None  # the text handed out as it comes (streaming requests)
    text: str | None = None  # set at a stop string: the output's text cut before it
    finish_reason: FinishReason | None = None
    batch: int = 0  # the engine step that first admitted it (0: not yet)
    batch_size: int = 0
    added_at: float = 0.0  # wall clock, time.time()
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    compute_s: float = 0.0  # its share of the steps that computed it
    prefill_computed: int = 0  # prefill tokens computed over its life (incl. recompute)
    error: str | None = None  # why it failed (finish_reason ERROR)

    @classmethod
    def start(
        cls,
        request: EngineRequest,
        codec: TextCodec,
        device: torch.device,
        *,
        salt: str,
        arrival: float,
    ) -> EngineSequence:
        params = request.params
        return cls(
            seq_id=request.seq_id,
            token_ids=request.prompt_ids,
            max_tokens=params.max_tokens,
            priority=request.priority,
            arrival=arrival,
            salt=salt,
            params=params,
            ignore_eos=request.ignore_eos,
            codec=codec,
            generator=make_generator(params, device),
            detokenizer=(
                IncrementalDetokenizer(codec.decode) if params.stop or request.stream else None
            ),
            stops=StopWatch(params.stop) if params.stop else None,
            stream=TextStream(stop_margin(params.stop)) if request.stream else None,
            added_at=time.time(),
        )

    def admitted(self, step: int, batch_size: int, now: float) -> None:
        """Record the first admission (a recompute after preemption keeps the first)."""
        if not self.batch:
            self.batch, self.batch_size, self.admitted_at = step, batch_size, now

    def append(self, token: int) -> bool:
        now = time.time()
        self.first_token_at = self.first_token_at or now
        assert self.codec is not None
        if token in self.codec.eos_ids and not self.ignore_eos:
            self.finish_reason = FinishReason.STOP
        else:
            at_limit = super().append(token)
            new = self.detokenizer.push(token) if self.detokenizer is not None else ""
            if self.stream is not None:
                self.stream.add(new)
            if self.stops is not None and self.stops.see(new):
                self.text, self.finish_reason = self._cut_text(), FinishReason.STOP
            elif at_limit:
                self.finish_reason = FinishReason.LENGTH
        if self.finish_reason is not None:
            self.finished_at = now
        return self.finish_reason is not None

    def fail(self, error: str) -> None:
        """End it as failed (the engine has already dropped it from the scheduler)."""
        self.error, self.finish_reason, self.finished_at = error, FinishReason.ERROR, time.time()

    def _cut_text(self) -> str:
        """The output's text cut before its earliest stop string (one decode, at the stop)."""
        assert self.codec is not None
        text = self.codec.decode(self.output_ids)
        cut = find_stop(text, self.params.stop)
        return text if cut is None else text[:cut]

    def delta(self) -> TextDelta | None:
        """The text handed out since the last call (streaming requests), or None."""
        piece = self.stream.take() if self.stream is not None else None
        return None if piece is None else TextDelta(self.seq_id, *piece)

    def output(self) -> EngineOutput:
        assert self.codec is not None and self.finish_reason is not None
        tokens = self.output_ids
        text = self.text if self.text is not None else self.codec.decode(tokens)
        if self.stream is not None:
            self.stream.finish(text, self.finish_reason.value)
        return EngineOutput(
            seq_id=self.seq_id,
            token_ids=tokens,
            text=text,
            finish_reason=self.finish_reason,
            prompt_tokens=self.num_prompt_tokens,
            cached_tokens=self.num_cached,
            computed_tokens=self.computed_tokens,
            computed_prompt_tokens=self.prefill_computed,
            compute_s=self.compute_s,
            batch=self.batch,
            batch_size=self.batch_size,
            added_at=self.added_at,
            admitted_at=self.admitted_at,
            first_token_at=self.first_token_at,
            finished_at=self.finished_at,
            error=self.error,
            draft_tokens=self.draft_tokens,
            accepted_tokens=self.accepted_tokens,
        )
