"""The paged engine: continuous batching over a block-laid KV cache with a prefix cache
shared across jobs (per-tenant salted), on any transformers causal LM of the Llama family."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from kv import KVCacheManager, tenant_salt
from scheduler.continuous import ContinuousScheduler, SeqState
from worker.decoding import Progress, TextCodec
from worker.engine_api import BatchStats, EngineOutput, EngineRequest
from worker.model_loading import pick_device
from worker.paged_runner import DecodeInput, PagedRunner, PrefillInput
from worker.sampling import sample_next


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_tokens: int = 32768  # KV capacity, in tokens, across all sequences
    max_num_seqs: int = 64
    max_step_tokens: int = 2048
    aging_s: float = 5.0
    prefix_cache: bool = True
    cache_secret: str = "inferq"  # keys the per-tenant salts; set from the environment
    gptq_backend: str = "auto"  # GPTQ kernel: auto picks the fastest that loads here


@dataclass
class _Live:
    progress: Progress
    entered: float


@dataclass
class EngineTotals:
    steps: int = 0
    computed_tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0


class PagedEngine:
    """`Engine` with `add`/`step` for streaming use and `generate` for a closed batch."""

    def __init__(
        self,
        model_path: str,
        model_name: str,
        device: str = "auto",
        dtype: str = "auto",
        config: EngineConfig | None = None,
    ):
        self.model_name = model_name
        self.config = cfg = config or EngineConfig()
        self.device = pick_device(device)
        num_blocks = -(-cfg.kv_cache_tokens // cfg.block_size)
        self.runner = PagedRunner(
            model_path,
            device=self.device,
            dtype=dtype,
            num_blocks=num_blocks,
            block_size=cfg.block_size,
            gptq_backend=cfg.gptq_backend,
        )
        self.codec = TextCodec(
            AutoTokenizer.from_pretrained(model_path), self.runner.model.generation_config
        )
        self.tokenizer = self.codec.tokenizer
        self.kv = KVCacheManager(num_blocks, cfg.block_size, model_id=model_name)
        self.scheduler = ContinuousScheduler(
            self.kv,
            max_num_seqs=cfg.max_num_seqs,
            max_step_tokens=cfg.max_step_tokens,
            aging_s=cfg.aging_s,
        )
        self.max_context = int(getattr(self.runner.model.config, "max_position_embeddings", 2048))
        self.totals = EngineTotals()
        self._live: dict[str, _Live] = {}

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        return self.codec.encode(prompt, messages)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, request: EngineRequest, priority: int = 0) -> None:
        """Queue a sequence; ValueError if it can never fit the KV cache."""
        now = time.perf_counter()
        salt = (
            tenant_salt(request.cache_salt, self.config.cache_secret)
            if self.config.prefix_cache
            else f"nocache:{request.seq_id}"
        )
        seq = SeqState(
            request.seq_id,
            list(request.prompt_ids),
            request.params.max_tokens,
            priority=priority,
            arrival=now,
            salt=salt,
        )
        self.scheduler.add(seq)
        self._live[request.seq_id] = _Live(Progress.start(request, self.device), now)

    def abort(self, seq_id: str) -> None:
        self.scheduler.abort(seq_id)
        self._live.pop(seq_id, None)

    def step(self) -> list[EngineOutput]:
        """One scheduling step and one forward; returns the sequences that finished."""
        plan = self.scheduler.schedule(time.perf_counter())
        if plan.empty:
            return []
        logits = self.runner.forward(
            [PrefillInput(p.token_ids, p.start_pos, p.block_table) for p in plan.prefills],
            [DecodeInput(d.token_id, d.pos, d.block_table) for d in plan.decodes],
        )
        seq_ids = [p.seq_id for p in plan.prefills] + [d.seq_id for d in plan.decodes]
        live = [self._live[s] for s in seq_ids]
        tokens = sample_next(
            logits, [lv.progress.req.params for lv in live], [lv.progress.gen for lv in live]
        ).tolist()
        now = time.perf_counter()
        finished = {
            s
            for s, lv, t in zip(seq_ids, live, tokens, strict=True)
            if lv.progress.advance(t, now, self.codec)
        }
        done = self.scheduler.on_step(dict(zip(seq_ids, tokens, strict=True)), finished)
        prefill = sum(len(p.token_ids) for p in plan.prefills)
        self.totals.steps += 1
        self.totals.prefill_tokens += prefill
        self.totals.decode_tokens += len(plan.decodes)
        self.totals.computed_tokens += prefill + len(plan.decodes)
        outputs = []
        for seq in done:
            lv = self._live.pop(seq.seq_id)
            outputs.append(lv.progress.output(lv.entered, self.codec, cached_tokens=seq.num_cached))
        return outputs

    def generate(self, requests: list[EngineRequest]) -> tuple[list[EngineOutput], BatchStats]:
        """Run a closed set of requests to completion (outputs in request order)."""
        start, before = time.perf_counter(), self.totals.computed_tokens
        wanted = {r.seq_id for r in requests}
        results: dict[str, EngineOutput] = {}
        try:
            for r in requests:
                self.add(r)
            while wanted - results.keys():
                for out in self.step():
                    results[out.seq_id] = out
        except BaseException:
            for seq_id in wanted - results.keys():
                self.abort(seq_id)
            raise
        computed = self.totals.computed_tokens - before
        cached = sum(results[r.seq_id].cached_tokens for r in requests)
        stats = BatchStats(
            len(requests),
            computed,
            computed,
            time.perf_counter() - start,
            extra={"cached_tokens": float(cached)},
        )
        return [results[r.seq_id] for r in requests], stats

    @torch.inference_mode()
    def warm_up(self) -> None:
        """A tiny request, so kernel set-up is not charged to the first jobs."""
        from api_client.schema import SamplingParams

        self.generate(
            [
                EngineRequest(
                    "warm-up", [self.codec.pad_id] * 8, SamplingParams(max_tokens=2), "warm-up"
                )
            ]
        )
