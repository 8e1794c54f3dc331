"""A batched engine over a transformers causal LM: left-padded prefill, then batched decode
with finished rows dropped from the KV cache, per-sequence sampling and stop strings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from api_client.schema import SamplingParams
from worker.engine_api import BatchStats, EngineOutput, EngineRequest, FinishReason
from worker.sampling import find_stop, make_generator, sample_next


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


@dataclass
class _Seq:
    req: EngineRequest
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: FinishReason | None = None
    first_token_at: float = 0.0
    done_at: float = 0.0


class PaddedEngine:
    """The `Engine` for this release: one forward per step over a left-padded batch."""

    def __init__(self, model_path: str, model_name: str, device: str = "auto", dtype: str = "auto"):
        self.model_name = model_name
        self.device = pick_device(device)
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=pick_dtype(dtype, self.device)
        ).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids = {i for i in eos_ids if i is not None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny batch, so kernel set-up (seconds on CPU) is not charged to the first jobs."""
        warm = EngineRequest("warm-up", [self.pad_id] * 16, SamplingParams(max_tokens=2))
        self.generate([warm, warm])

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        if messages is not None:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            return list(encoded.get("input_ids", encoded))
        return list(self.tokenizer(prompt or "")["input_ids"])

    @torch.inference_mode()
    def generate(self, requests: list[EngineRequest]) -> tuple[list[EngineOutput], BatchStats]:
        start = time.perf_counter()
        seqs = [_Seq(r, make_generator(r.params, self.device)) for r in requests]
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - lengths[row] :] = torch.tensor(r.prompt_ids)
            mask[row, width - lengths[row] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        decoded = 0  # decode-step tokens computed (finished rows are dropped: no padding)
        active = list(range(len(seqs)))
        last_pos = positions[:, -1]
        while True:
            now_params = [seqs[i].req.params for i in active]
            next_ids = sample_next(logits, now_params, [seqs[i].gen for i in active])
            now = time.perf_counter()
            keep = [
                k for k, i in enumerate(active) if not self._advance(seqs[i], int(next_ids[k]), now)
            ]
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_ids, last_pos = mask[index], next_ids[index], last_pos[index]
                active = [active[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            last_pos = last_pos + 1
            logits = self.model(
                input_ids=next_ids[:, None],
                attention_mask=mask,
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1, :]
            decoded += len(active)
        outputs = [self._output(s, start) for s in seqs]
        real, padded = sum(lengths) + decoded, len(seqs) * width + decoded
        stats = BatchStats(len(seqs), real, padded, time.perf_counter() - start)
        return outputs, stats

    def _advance(self, seq: _Seq, token: int, now: float) -> bool:
        """Append a sampled token; True when the sequence has finished."""
        if not seq.tokens and not seq.first_token_at:
            seq.first_token_at = now
        params = seq.req.params
        if token in self.eos_ids:
            seq.finish = "stop"
        else:
            seq.tokens.append(token)
            if params.stop:
                seq.text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
                cut = find_stop(seq.text, params.stop)
                if cut is not None:
                    seq.text, seq.finish = seq.text[:cut], "stop"
            if seq.finish is None and len(seq.tokens) >= params.max_tokens:
                seq.finish = "length"
        if seq.finish is not None:
            seq.done_at = now
        return seq.finish is not None

    def _output(self, seq: _Seq, start: float) -> EngineOutput:
        text = seq.text if seq.req.params.stop else ""
        if not seq.req.params.stop:
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        return EngineOutput(
            seq_id=seq.req.seq_id,
            token_ids=seq.tokens,
            text=text,
            finish_reason=seq.finish or "length",
            prompt_tokens=len(seq.req.prompt_ids),
            first_token_s=seq.first_token_at - start,
            decode_s=seq.done_at - seq.first_token_at,
        )
