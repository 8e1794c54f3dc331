"""Chunked prefill on the real model (fp32, CPU): prompts of several hundred tokens prefilled
in chunks of 16 or 64 tokens, beside running decodes, give HF `generate`'s greedy tokens on
the C-kernel and the torch paths, cold and warm cache, under preemption; seeded sampling gives
the same tokens chunked or not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from inferq.params import EngineConfig
from scheduler import StepPlan
from worker.engine import native
from worker.engine.api import EngineOutput, EngineRequest, SamplingParams
from worker.engine.codec import TextCodec
from worker.engine.engine import PagedEngine

pytestmark = pytest.mark.model
HELDOUT = Path(__file__).parents[2] / "worker" / "data" / "heldout.txt"
UNCHUNKED = 1 << 20  # more than any prompt: each prefilled in one step
SHORT_TOKENS, LONG_TOKENS = 20, 8


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_tokens: int
    long: bool


@pytest.fixture(scope="module")
def codec(model_path: str) -> TextCodec:
    return TextCodec.from_model_dir(model_path)


@pytest.fixture(scope="module")
def prompts(codec: TextCodec) -> list[Prompt]:
    """Three short chats (running decodes when the long ones arrive), three long stretches of
    the held-out text (260-410 tokens) and two long prompts sharing a 200-token prefix."""
    text = codec.encode(HELDOUT.read_text(), None)
    shorts = [
        codec.encode(None, [{"role": "user", "content": q}])
        for q in ("Why is the sky blue?", "Name a famous river.", "Write a haiku about rain.")
    ]
    longs = [text[at : at + n] for at, n in ((0, 260), (1000, 333), (2500, 410))]
    shared = [text[4000:4200] + text[5000 + 80 * k : 5060 + 80 * k] for k in range(2)]
    return [Prompt(ids, SHORT_TOKENS, False) for ids in shorts] + [
        Prompt(ids, LONG_TOKENS, True) for ids in longs + shared
    ]


@pytest.fixture(scope="module")
def references(codec: TextCodec, prompts: list[Prompt], model_path: str) -> list[list[int]]:
    """HF `generate` on the same weights, one prompt at a time, greedy, cut at eos."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    refs = []
    for p in prompts:
        out = model.generate(
            input_ids=torch.tensor([p.ids]), max_new_tokens=p.max_tokens, do_sample=False
        )[0, len(p.ids) :].tolist()
        cut = next((i for i, t in enumerate(out) if t in codec.eos_ids), len(out))
        refs.append(out[:cut])
    return refs


def _engine(model_path: str, chunk: int, *, use_native: bool = True, kv: int = 8192):
    config = EngineConfig(prefill_chunk_tokens=chunk, native=use_native, kv_cache_tokens=kv)
    engine = PagedEngine(model_path, "chunked", device="cpu", dtype="float32", config=config)
    if use_native and native.library() is not None:
        assert engine.runner.lean is not None  # the C-kernel path is the one under test
    if not use_native:
        assert engine.runner.lean is None and not engine.runner.native
    return engine


def _run(
    engine: PagedEngine, prompts: list[Prompt], tag: str, **sampling: Any
) -> tuple[list[EngineOutput], list[StepPlan]]:
    """The short prompts first; after 3 steps (they are decoding) the long ones arrive. Every
    step's plan is recorded (a spy on the engine's own scheduler)."""
    plans: list[StepPlan] = []
    schedule = engine.scheduler.schedule

    def spy(now: float) -> StepPlan:
        plans.append(schedule(now))
        return plans[-1]

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    reqs = [
        EngineRequest(
            seq_id=f"{tag}-{i}",
            prompt_ids=p.ids,
            params=SamplingParams(max_tokens=p.max_tokens, **sampling),
            tenant=tag.split("-")[0],
        )
        for i, p in enumerate(prompts)
    ]
    outputs: dict[str, EngineOutput] = {}
    try:
        for req, p in zip(reqs, prompts, strict=True):
            if not p.long:
                engine.add(req)
        for _ in range(3):
            outputs.update((o.seq_id, o) for o in engine.step())
        for req, p in zip(reqs, prompts, strict=True):
            if p.long:
                engine.add(req)
        while engine.has_work:
            outputs.update((o.seq_id, o) for o in engine.step())
    finally:
        del engine.scheduler.schedule
    assert engine.stats().blocks_used == 0
    return [outputs[r.seq_id] for r in reqs], plans


def _chunks(plans: list[StepPlan], seq_id: str) -> list[tuple[int, int, bool]]:
    """(start, length, final) of each prefill chunk of ``seq_id``."""
    return [
        (w.start_pos, len(w.token_ids), w.final)
        for plan in plans
        for w in plan.prefills
        if w.seq_id == seq_id
    ]


@pytest.mark.parametrize(
    ("chunk", "use_native"), [(16, True), (64, True), (64, False)], ids=["16", "64", "64-torch"]
)
def test_chunked_prefill_beside_decodes_matches_hf(
    model_path, prompts, references, chunk, use_native
) -> None:
    engine = _engine(model_path, chunk, use_native=use_native)
    for run in ("cold", "warm"):  # warm: the prompts' blocks are cached from the cold run
        outs, plans = _run(engine, prompts, f"t{chunk}-{run}")
        assert [o.token_ids for o in outs] == references, run
        for o, p in zip(outs, prompts, strict=True):
            chunks = _chunks(plans, o.seq_id)
            assert [final for *_, final in chunks] == [False] * (len(chunks) - 1) + [True]
            assert chunks[0][0] == o.cached_tokens  # the first chunk starts after the hit
            computed = len(p.ids) - o.cached_tokens  # in full chunks (the budget is not short)
            assert [n for _, n, _ in chunks] == [chunk] * (computed // chunk) + (
                [computed % chunk] if computed % chunk else []
            )
            if run == "warm":  # every full block of the prompt hit (but the last, if full)
                assert o.cached_tokens >= 16 * (len(p.ids) // 16 - 1)
        assert all(plan.num_tokens <= engine.scheduler.max_step_tokens for plan in plans)
        if run == "cold":
            beside = [p for p in plans if p.decodes and any(not w.final for w in p.prefills)]
            assert beside, "no step ran decodes beside a chunk"
            assert outs[-1].cached_tokens >= 192  # the prompt sharing a prefix waited for it


def test_preempted_chunked_prefills_keep_outputs_exact(model_path, prompts, references) -> None:
    """A cache of 48 blocks cannot hold the long prompts at once: sequences are preempted in
    the middle of their prefill and recomputed (from their cached blocks) later."""
    engine = _engine(model_path, 64, kv=16 * 48)
    outs, plans = _run(engine, prompts, "tiny")
    assert [o.token_ids for o in outs] == references
    preempted = {sid for plan in plans for sid in plan.preempted}
    assert preempted
    mid_prefill = [
        sid
        for i, plan in enumerate(plans[1:])
        for sid in plan.preempted
        if any(w.seq_id == sid and not w.final for w in plans[i].prefills)
    ]
    assert mid_prefill, "no sequence was preempted in the middle of its prefill"


def test_seeded_sampling_is_the_same_chunked_or_not(model_path, prompts, references) -> None:
    sampling = {"temperature": 0.9, "top_k": 50, "seed": 1234}
    chunked, chunked_plans = _run(_engine(model_path, 16), prompts, "s16", **sampling)
    whole, whole_plans = _run(_engine(model_path, UNCHUNKED), prompts, "sall", **sampling)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    assert [o.token_ids for o in chunked] != references  # control: it did sample
    for o in whole:  # control: the unchunked engine prefilled each prompt in one step
        assert len(_chunks(whole_plans, o.seq_id)) == 1
    assert max(len(_chunks(chunked_plans, o.seq_id)) for o in chunked) > 1
