"""A batched engine over a transformers causal LM: left-padded prefill, then batched decode
with finished rows dropped from the KV cache, per-sequence sampling and stop strings."""

from __future__ import annotations

import time

import torch
from transformers import AutoTokenizer, DynamicCache

from api_client.schema import SamplingParams
from worker.decoding import Progress, TextCodec
from worker.engine_api import BatchStats, EngineOutput, EngineRequest
from worker.model_loading import load_causal_lm, pick_device
from worker.sampling import sample_next


class PaddedEngine:
    """The `Engine` for this release: one forward per step over a left-padded batch."""

    def __init__(
        self,
        model_path: str,
        model_name: str,
        device: str = "auto",
        dtype: str = "auto",
        gptq_backend: str = "auto",
    ):
        self.model_name = model_name
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        loaded = load_causal_lm(model_path, self.device, dtype, gptq_backend=gptq_backend)
        self.model, self.kernel = loaded.model, loaded.kernel
        self.codec = TextCodec(self.tokenizer, self.model.generation_config)
        self.pad_id = self.codec.pad_id
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny batch, so kernel set-up (seconds on CPU) is not charged to the first jobs."""
        warm = EngineRequest("warm-up", [self.pad_id] * 16, SamplingParams(max_tokens=2))
        self.generate([warm, warm])

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        return self.codec.encode(prompt, messages)

    @torch.inference_mode()
    def generate(self, requests: list[EngineRequest]) -> tuple[list[EngineOutput], BatchStats]:
        start = time.perf_counter()
        seqs = [Progress.start(r, self.device) for r in requests]
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
                k
                for k, i in enumerate(active)
                if not seqs[i].advance(int(next_ids[k]), now, self.codec)
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
        outputs = [s.output(start, self.codec) for s in seqs]
        real, padded = sum(lengths) + decoded, len(seqs) * width + decoded
        stats = BatchStats(len(seqs), real, padded, time.perf_counter() - start)
        return outputs, stats
