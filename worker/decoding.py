"""What every engine does around the model: tokenize, track each sequence's tokens, stop
strings, finish reason and timings, and turn that into an `EngineOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.engine_api import EngineOutput, EngineRequest, FinishReason
from worker.sampling import find_stop, make_generator


class TextCodec:
    """The tokenizer plus the model's end-of-sequence ids."""

    def __init__(self, tokenizer, generation_config):
        self.tokenizer = tokenizer
        eos = generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids = {i for i in eos_ids if i is not None}
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages rendered with the chat template."""
        if messages is not None:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            return list(encoded.get("input_ids", encoded))
        return list(self.tokenizer(prompt or "")["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


@dataclass
class Progress:
    """One sequence being generated."""

    req: EngineRequest
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # decoded eagerly only when stop strings are watched
    finish: FinishReason | None = None
    first_token_at: float = 0.0
    done_at: float = 0.0

    @classmethod
    def start(cls, req: EngineRequest, device: torch.device) -> Progress:
        return cls(req, make_generator(req.params, device))

    def advance(self, token: int, now: float, codec: TextCodec) -> bool:
        """Take a sampled token; True when the sequence has finished."""
        if not self.first_token_at:
            self.first_token_at = now
        params = self.req.params
        if token in codec.eos_ids:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            if params.stop:
                self.text = codec.decode(self.tokens)
                cut = find_stop(self.text, params.stop)
                if cut is not None:
                    self.text, self.finish = self.text[:cut], "stop"
            if self.finish is None and len(self.tokens) >= params.max_tokens:
                self.finish = "length"
        if self.finish is not None:
            self.done_at = now
        return self.finish is not None

    def output(self, started: float, codec: TextCodec, cached_tokens: int = 0) -> EngineOutput:
        """The result; times are relative to `started` (when the sequence entered the engine)."""
        return EngineOutput(
            seq_id=self.req.seq_id,
            token_ids=self.tokens,
            text=self.text if self.text is not None else codec.decode(self.tokens),
            finish_reason=self.finish or "length",
            prompt_tokens=len(self.req.prompt_ids),
            cached_tokens=cached_tokens,
            first_token_s=self.first_token_at - started,
            decode_s=self.done_at - self.first_token_at,
        )
