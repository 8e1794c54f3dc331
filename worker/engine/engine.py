"""The paged engine: continuous batching over a block-laid KV cache with a prefix cache
shared across jobs (per-tenant salted), on a transformers causal LM of a tested family
(worker/engine/families.py; others are refused at load)."""

from __future__ import annotations

import time
from typing import cast

import torch

from inferq.params import EngineConfig
from kv import KVCacheManager, tenant_salt
from scheduler import ContinuousScheduler, Speculation
from worker.engine.api import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    SamplingParams,
    SeqId,
    TextDelta,
    run_to_completion,
)
from worker.engine.codec import TextCodec
from worker.engine.counters import StepCounters
from worker.engine.loading import pick_device
from worker.engine.runner import PagedRunner
from worker.engine.sampling import INVALID, sample_verified
from worker.engine.sequence import EngineSequence


def speculation(cfg: EngineConfig) -> Speculation | None:
    """Prompt-lookup speculative decoding as `cfg` sets it (None: ``spec_tokens`` 0, off)."""
    if cfg.spec_tokens <= 0:
        return None
    return Speculation(
        cfg.spec_tokens,
        min_n=cfg.spec_ngram_min,
        max_n=cfg.spec_ngram_max,
        max_running=cfg.spec_max_running,
        min_acceptance=cfg.spec_min_acceptance,
    )


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
        self.runner = PagedRunner(model_path, device=self.device, dtype=dtype, config=cfg)
        self.plan = self.runner.plan  # KV blocks and step budget (worker.engine.memory)
        self.codec = TextCodec.from_model_dir(model_path)
        self.kv = KVCacheManager(self.plan.blocks, cfg.block_size, model_id=model_name)
        self.scheduler = ContinuousScheduler(
            self.kv,
            max_num_seqs=cfg.max_num_seqs,
            max_step_tokens=self.plan.step_tokens,
            prefill_chunk_tokens=cfg.prefill_chunk_tokens,
            aging_s=cfg.aging_s,
            speculation=speculation(cfg),
        )
        self.max_context = int(getattr(self.runner.model.config, "max_position_embeddings", 2048))
        self.max_num_seqs = cfg.max_num_seqs
        self.counters = StepCounters()
        self._deltas: list[TextDelta] = []  # the last step's, for streaming sequences

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

    def abort(self, seq_id: SeqId) -> float:
        seq = self.scheduler.get(seq_id)
        self.scheduler.abort(seq_id)
        return cast(EngineSequence, seq).compute_s if seq is not None else 0.0

    def step(self) -> list[EngineOutput]:
        """One scheduling step and one forward; returns the sequences that finished."""
        started = time.perf_counter()
        self._deltas = []
        plan = self.scheduler.schedule(started)
        if plan.empty:
            return []
        counters = self.counters
        chunked = cast(list[EngineSequence], [p.seq for p in plan.prefills])
        firsts = [s for s in chunked if not s.batch]  # a prompt's first chunk admits it
        now = time.time()
        for seq in firsts:
            seq.admitted(counters.steps + 1, len(firsts), now)
        logits = self.runner.forward(plan.prefills, plan.decodes)  # rows: see StepPlan.sampled
        seqs = cast(list[EngineSequence], plan.sampled)  # final chunks first, as the logits
        drafts = [()] * (len(seqs) - len(plan.decodes)) + [d.draft for d in plan.decodes]
        sampled: dict[SeqId, list[int]] = {}
        if seqs:
            kept = sample_verified(
                logits, [s.params for s in seqs], [s.generator for s in seqs], drafts
            )
            sampled = dict(zip((s.seq_id for s in seqs), kept, strict=True))
        failed = self._fail_invalid(seqs, sampled)
        before = [d.seq.computed_tokens for d in plan.decodes]
        done = cast(list[EngineSequence], self.scheduler.on_step(sampled)) + failed
        work: list[tuple[EngineSequence, int]] = []
        for seq, p in zip(chunked, plan.prefills, strict=True):
            n = len(p.token_ids)
            seq.prefill_computed += n
            counters.prefill_tokens += n
            counters.recompute_tokens += n if seq.preemptions else 0
            work.append((seq, n))
        for d, b in zip(plan.decodes, before, strict=True):
            work.append((cast(EngineSequence, d.seq), d.num_tokens))
            counters.decode_tokens += d.seq.computed_tokens - b  # the positions kept
            if d.draft and d.seq_id in sampled:
                counters.draft_tokens += len(d.draft)
                counters.accepted_tokens += len(sampled[d.seq_id]) - 1
        outputs = [seq.output() for seq in done]
        counters.charge(time.perf_counter() - started, work, sampled=len(seqs))
        for seq, out in zip(done, outputs, strict=True):
            out.compute_s = seq.compute_s
        self._deltas = [d for seq in seqs if (d := seq.delta()) is not None]
        return outputs

    def deltas(self) -> list[TextDelta]:
        return self._deltas

    def _fail_invalid(
        self, seqs: list[EngineSequence], sampled: dict[SeqId, list[int]]
    ) -> list[EngineSequence]:
        """Drop the sequences whose row had no valid distribution (see `sample_verified`): they
        end failed, their blocks freed; `on_step` then skips them and serves the rest."""
        failed = [s for s in seqs if sampled[s.seq_id][-1] == INVALID]
        for seq in failed:
            del sampled[seq.seq_id]
            self.scheduler.abort(seq.seq_id)
            seq.fail("the model's next-token distribution was not finite (NaN or inf logits)")
        return failed

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
        ids, params = [self.codec.pad_id] * 8, SamplingParams(max_tokens=2)
        run_to_completion(self, [EngineRequest(seq_id="warm-up", prompt_ids=ids, params=params)])
