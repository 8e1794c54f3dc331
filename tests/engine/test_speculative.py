"""Speculative decoding by prompt lookup (docs/speculative.md): greedy outputs are HF
`generate`'s token for token with drafts verified in one forward (tiny random models on the
C-kernel and torch paths, and the real model on a prompt whose answer repeats it), seeded
sampling draws the same tokens with or without drafts, and the KV cache stays consistent:
no block holding a rejected draft is ever hashed, and the blocks it caches hold the KV a
plain prefill computes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tiny_models import build, reference
from transformers import AutoModelForCausalLM

from inferq.params import EngineConfig
from kv import tenant_salt
from kv.hashing import block_hashes
from worker.engine.api import EngineOutput, EngineRequest, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_TOKENS = 40


def _repeating(seed: int) -> list[int]:
    """A random phrase of 12 tokens said four times and a half: lookups find it."""
    rng = random.Random(seed)
    phrase = [rng.randrange(3, 512) for _ in range(12)]
    return phrase * 4 + phrase[:5]


PROMPTS = [_repeating(seed) for seed in range(4)] + [list(range(40, 90))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[list[int]]]:
    path = build("llama", tmp_path_factory.mktemp("spec"))
    return str(path), reference(path, PROMPTS, MAX_TOKENS)


def _engine(path: str, spec_tokens: int, *, use_native: bool = True, **more) -> PagedEngine:
    config = EngineConfig(native=use_native, kv_cache_tokens=4096, spec_tokens=spec_tokens, **more)
    return PagedEngine(path, "tiny", device="cpu", dtype="float32", config=config)


def _run(engine: PagedEngine, prompts: list[list[int]], **params) -> list[EngineOutput]:
    sampling = SamplingParams(**{"max_tokens": MAX_TOKENS, **params})
    requests = [
        EngineRequest(seq_id=f"r{i}", prompt_ids=ids, params=sampling)
        for i, ids in enumerate(prompts)
    ]
    return run_to_completion(engine, requests)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("spec_tokens", [1, 4, 7])
def test_greedy_with_drafts_is_hf_generate(tiny, use_native: bool, spec_tokens: int) -> None:
    path, refs = tiny
    engine = _engine(path, spec_tokens, use_native=use_native, spec_max_running=8)
    outputs = _run(engine, PROMPTS)
    assert [o.token_ids for o in outputs] == refs
    stats = engine.stats()
    assert 0 < stats.accepted_tokens < stats.draft_tokens  # drafts kept and drafts rejected
    assert sum(o.accepted_tokens for o in outputs) == stats.accepted_tokens
    assert sum(o.draft_tokens for o in outputs) == stats.draft_tokens
    # every kept position was computed once: prompt, then one per output token but the last
    assert stats.decode_tokens == sum(len(o.token_ids) - 1 for o in outputs)


def test_each_job_reports_its_drafted_and_accepted_tokens(tiny) -> None:
    """A job's output carries its own counts (what the worker stores in `job_metrics`): a
    repeating prompt alone drafts and keeps some (drafted >= accepted > 0); off, 0 and 0."""
    path, refs = tiny
    (on,) = _run(_engine(path, 4), PROMPTS[:1])
    (off,) = _run(_engine(path, 0), PROMPTS[:1])
    assert on.token_ids == off.token_ids == refs[0]
    assert on.draft_tokens >= on.accepted_tokens > 0
    assert (off.draft_tokens, off.accepted_tokens) == (0, 0)


def test_steps_above_the_running_threshold_do_not_draft(tiny) -> None:
    path, refs = tiny
    engine = _engine(path, 4, spec_max_running=len(PROMPTS) - 1)
    staggered = [PROMPTS[0]]  # alone at first: it drafts until the others join
    outputs = _run(engine, staggered)
    alone = engine.stats().draft_tokens
    assert alone > 0
    outputs = _run(engine, PROMPTS)  # five decoding at once (until the first finishes)
    assert [o.token_ids for o in outputs] == refs
    together = engine.stats().draft_tokens - alone
    assert together < alone  # the batch drafted only in its last steps, when fewer ran


def test_low_acceptance_stops_drafting(tiny) -> None:
    """Prompts whose lookups are mostly wrong (the random model does not repeat the
    counting prompt) draft far less when the acceptance floor is high."""
    path, refs = tiny
    drafted = {}
    for floor in (0.0, 1.0):
        engine = _engine(path, 4, spec_min_acceptance=floor, spec_max_running=8)
        outputs = _run(engine, PROMPTS)
        assert [o.token_ids for o in outputs] == refs
        drafted[floor] = engine.stats().draft_tokens
    assert drafted[1.0] < drafted[0.0] / 2


def test_seeded_sampling_draws_the_same_tokens_with_drafts(tiny) -> None:
    path, _ = tiny
    params = {"temperature": 0.3, "seed": 7}
    plain = _run(_engine(path, 0), PROMPTS, **params)
    engine = _engine(path, 4, spec_max_running=8)
    drafted = _run(engine, PROMPTS, **params)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    assert engine.stats().accepted_tokens > 0


def test_rejected_drafts_are_never_cached(tiny) -> None:
    """After jobs whose drafts were partly rejected, every hash the prefix cache holds is a
    block of kept tokens, and each cached block holds the KV a plain prefill of those tokens
    computes; a job that hits those blocks still generates HF's tokens."""
    path, _ = tiny
    engine = _engine(path, 4, spec_max_running=8)
    outputs = _run(engine, PROMPTS)
    stats = engine.stats()
    assert stats.accepted_tokens < stats.draft_tokens  # some drafts were rejected
    bs, salt = engine.kv.block_size, tenant_salt("", engine.config.cache_secret)
    kept = [ids + o.token_ids for ids, o in zip(PROMPTS, outputs, strict=True)]
    expected = {h for ids in kept for h in block_hashes(ids, bs, engine.kv.model_id, salt)}
    cached = engine.kv.pool.indexed()
    assert cached and set(cached) <= expected

    plain = _engine(path, 0)  # the same tokens prefilled without drafts
    _run(plain, kept, max_tokens=1)
    theirs = plain.kv.pool.indexed()
    for h, block in cached.items():
        rows = slice(block * bs, (block + 1) * bs)
        other = slice(theirs[h] * bs, (theirs[h] + 1) * bs)
        for ours, ref in zip(
            (engine.runner.kv.k, engine.runner.kv.v),
            (plain.runner.kv.k, plain.runner.kv.v),
            strict=True,
        ):
            torch.testing.assert_close(ours[:, :, rows], ref[:, :, other], atol=1e-4, rtol=1e-4)

    hits_before = engine.stats().cache_hit_tokens
    again = _run(engine, [kept[0][:-3]])  # its blocks are cache hits now
    assert engine.stats().cache_hit_tokens > hits_before
    assert again[0].token_ids == reference(Path(path), [kept[0][:-3]], MAX_TOKENS)[0]


@pytest.mark.model
def test_real_model_repeating_a_passage_accepts_drafts(model_path: str) -> None:
    """SmolLM2 asked to repeat a passage (fp32): drafts are accepted, the tokens are HF's."""
    engine = PagedEngine(
        model_path, "real", device="cpu", dtype="float32", config=EngineConfig(spec_tokens=4)
    )
    passage = (Path(__file__).parents[2] / "worker" / "data" / "heldout.txt").read_text()[:300]
    ids = engine.codec.encode(
        None, [{"role": "user", "content": "Repeat this text word for word:\n\n" + passage}]
    )
    (out,) = run_to_completion(
        engine, [EngineRequest(seq_id="a", prompt_ids=ids, params=SamplingParams(max_tokens=32))]
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ref = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    ref_ids = ref[0, len(ids) :].tolist()
    cut = next((i for i, t in enumerate(ref_ids) if t in engine.codec.eos_ids), len(ref_ids))
    assert out.token_ids == ref_ids[:cut]
    assert out.accepted_tokens > 0 and engine.stats().accepted_tokens == out.accepted_tokens
