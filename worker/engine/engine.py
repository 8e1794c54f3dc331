"""The paged engine: continuous batching over a block-laid KV cache with a prefix cache
shared across jobs (per-tenant salted), on any transformers causal LM of the Llama family."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import torch

from kv import KVCacheManager, tenant_salt
from scheduler import ContinuousScheduler
from worker.engine.api import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    SamplingParams,
    run_to_completion,
)
from worker.engine.codec import TextCodec
from worker.engine.counters import StepCounters
from worker.engine.loading import pick_device
from worker.engine.runner import DecodeInput, PagedRunner, PrefillInput
from worker.engine.sampling import sample_next
from worker.engine.sequence import EngineSequence


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
    native: bool = True  # CPU: the lean forward on C kernels where they build; False: torch


class PagedEngine:
    """`api.Engine` over a paged, prefix-cached KV cache. One thread owns it."""

    def __init__(
        self,
        model_path: str,
        model_name: str,
        device: str = "auto",
        dtype: str = "auto",
        config: EngineConfig | None = None,
    ) -> None:
        self.model_path = model_path
        self.model_name = model_name
        self.config = cfg = config or EngineConfig()
        self.device = pick_device(device)
        self.device_class = (
            f"cuda:{torch.cuda.get_device_name(self.device)}"
            if self.device.type == "cuda"
            else self.device.type
        )
        num_blocks = -(-cfg.kv_cache_tokens // cfg.block_size)
        self.runner = PagedRunner(
            model_path,
            device=self.device,
            dtype=dtype,
            num_blocks=num_blocks,
            block_size=cfg.block_size,
            gptq_backend=cfg.gptq_backend,
            use_native=cfg.native,
        )
        self.codec = TextCodec.from_model_dir(model_path)
        self.kv = KVCacheManager(num_blocks, cfg.block_size, model_id=model_name)
        self.scheduler = ContinuousScheduler(
            self.kv,
            max_num_seqs=cfg.max_num_seqs,
            max_step_tokens=cfg.max_step_tokens,
            aging_s=cfg.aging_s,
        )
        self.max_context = int(getattr(self.runner.model.config, "max_position_embeddings", 2048))
        self.max_num_seqs = cfg.max_num_seqs
        self.counters = StepCounters()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def new_codec(self) -> TextCodec:
        """A fresh tokenizer of this engine's model, for another thread to own."""
        return TextCodec.from_model_dir(self.model_path)

    def add(self, request: EngineRequest) -> None:
        """Queue a sequence; ValueError if it is a duplicate, too long, or can never fit."""
        total = len(request.prompt_ids) + request.params.max_tokens
        if total > self.max_context:
            raise ValueError(
                f"seq {request.seq_id!r}: prompt + max_tokens = {total} > {self.max_context}"
            )
        salt = (
            tenant_salt(request.tenant, self.config.cache_secret)
            if self.config.prefix_cache
            else f"nocache:{request.seq_id}"
        )
        seq = EngineSequence.start(
            request, self.codec, self.device, salt=salt, arrival=time.perf_counter()
        )
        self.scheduler.add(seq)

    def abort(self, seq_id: str) -> float:
        seq = self.scheduler.get(seq_id)
        self.scheduler.abort(seq_id)
        return cast(EngineSequence, seq).compute_s if seq is not None else 0.0

    def step(self) -> list[EngineOutput]:
        """One scheduling step and one forward; returns the sequences that finished."""
        started = time.perf_counter()
        plan = self.scheduler.schedule(started)
        if plan.empty:
            return []
        counters = self.counters
        seqs = cast(list[EngineSequence], plan.seqs)  # prefills first, as the logits
        firsts = [s for s in seqs[: len(plan.prefills)] if not s.batch]
        now = time.time()
        for seq in firsts:
            seq.admitted(counters.steps + 1, len(firsts), now)
        logits = self.runner.forward(
            [PrefillInput(p.token_ids, p.start_pos, p.block_table) for p in plan.prefills],
            [DecodeInput(d.token_id, d.pos, d.block_table) for d in plan.decodes],
        )
        tokens = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs])
        sampled = dict(zip((s.seq_id for s in seqs), tokens.tolist(), strict=True))
        done = cast(list[EngineSequence], self.scheduler.on_step(sampled))
        work: list[tuple[EngineSequence, int]] = []
        for p in plan.prefills:
            seq, n = cast(EngineSequence, p.seq), len(p.token_ids)
            seq.prefill_computed += n
            counters.prefill_tokens += n
            counters.recompute_tokens += n if seq.preemptions else 0
            work.append((seq, n))
        work += [(cast(EngineSequence, d.seq), 1) for d in plan.decodes]
        counters.decode_tokens += len(plan.decodes)
        outputs = [seq.output() for seq in done]
        counters.charge(time.perf_counter() - started, work)
        for seq, out in zip(done, outputs, strict=True):
            out.compute_s = seq.compute_s
        return outputs

    def stats(self) -> EngineStats:
        kv = self.kv.stats()
        return EngineStats(
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            **self.counters.figures(),
            cache_queried_tokens=kv.queried_tokens,
            cache_hit_tokens=kv.hit_tokens,
            blocks_used=kv.num_used,
            blocks_free=kv.num_free,
            blocks_evictable=kv.num_evictable,
            evictions=kv.evictions,
        )

    @torch.inference_mode()
    def warm_up(self) -> None:
        """A tiny request, so kernel set-up is not charged to the first jobs."""
        prompt = [self.codec.pad_id] * 8
        run_to_completion(self, [EngineRequest("warm-up", prompt, SamplingParams(max_tokens=2))])
