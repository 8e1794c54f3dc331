"""The engine's sequence: the scheduler's `Sequence` plus sampling, stop strings, finish reason
and timings, on one object per request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from scheduler import Sequence
from worker.engine.api import EngineOutput, EngineRequest, FinishReason, SamplingParams
from worker.engine.codec import TextCodec
from worker.engine.sampling import find_stop, make_generator


@dataclass(eq=False, kw_only=True)
class EngineSequence(Sequence):
    """A request being generated. `append` decides when it is finished: an eos token (not
    kept), a stop string (the text is cut before it) or max_tokens."""

    params: SamplingParams = field(default_factory=SamplingParams)
    codec: TextCodec | None = None
    generator: torch.Generator | None = None
    text: str | None = None  # decoded eagerly only when stop strings are watched
    finish_reason: FinishReason | None = None
    batch: int = 0  # the engine step that first admitted it (0: not yet)
    batch_size: int = 0
    added_at: float = 0.0  # wall clock, time.time()
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    compute_s: float = 0.0  # its share of the steps that computed it
    prefill_computed: int = 0  # prefill tokens computed over its life (incl. recompute)

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
            codec=codec,
            generator=make_generator(params, device),
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
        if token in self.codec.eos_ids and not self.params.ignore_eos:
            self.finish_reason = FinishReason.STOP
        else:
            at_limit = super().append(token)
            stop_cut = self._stop_cut() if self.params.stop else None
            if stop_cut is not None:
                self.text, self.finish_reason = stop_cut, FinishReason.STOP
            elif at_limit:
                self.finish_reason = FinishReason.LENGTH
        if self.finish_reason is not None:
            self.finished_at = now
        return self.finish_reason is not None

    def _stop_cut(self) -> str | None:
        """The text cut before its earliest stop string, if one has appeared."""
        assert self.codec is not None
        text = self.codec.decode(self.output_ids)
        cut = find_stop(text, self.params.stop)
        return None if cut is None else text[:cut]

    def output(self) -> EngineOutput:
        assert self.codec is not None and self.finish_reason is not None
        tokens = self.output_ids
        return EngineOutput(
            seq_id=self.seq_id,
            token_ids=tokens,
            text=self.text if self.text is not None else self.codec.decode(tokens),
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
        )
