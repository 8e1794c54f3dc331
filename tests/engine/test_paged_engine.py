"""The paged engine against HF `generate` on the same fp32 weights: greedy tokens identical
for 50 varied prompts, with and without prefix-cache hits, in several batch compositions."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from inferq.params import EngineConfig
from worker.engine import native
from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine

pytestmark = pytest.mark.model
MAX_TOKENS = 10
SYSTEMS = [
    "You are a helpful assistant who answers questions about geography, science and history "
    "with care and precision, always double-checking facts before answering.",
    "You are a terse assistant. Reply in as few words as possible, without any preamble.",
    "You are a friendly teacher for children aged eight to ten. Explain things simply and use "
    "short sentences and everyday examples that a child would know from home or school.",
]
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name a prime number above 10.",
    "Write a haiku about rain.",
    "What is 7 times 8?",
    "Who painted the Mona Lisa?",
    "How many legs does a spider have?",
    "What is water made of?",
    "Name a famous river.",
    "What do bees make?",
    "Explain gravity.",
    "What is the largest ocean?",
    "Give me a word that rhymes with cat.",
    "What color are bananas?",
    "How many days are in a leap year?",
    "What is the opposite of hot?",
]


def _prompts(engine: PagedEngine) -> list[list[int]]:
    """50 prompts: 3 system prompts x 16 questions (shared prefixes), plus 2 raw ones."""
    chats = [
        engine.codec.encode(
            None, [{"role": "system", "content": s}, {"role": "user", "content": q}]
        )
        for s in SYSTEMS
        for q in QUESTIONS
    ]
    raws = [
        engine.codec.encode("Once upon a time", None),
        engine.codec.encode("The three most important inventions in history are", None),
    ]
    return chats + raws


@pytest.fixture(scope="module")
def paged(paged_engine: PagedEngine) -> PagedEngine:
    return paged_engine


@pytest.fixture(scope="module")
def references(paged: PagedEngine, model_path: str) -> list[list[int]]:
    """HF `generate` on the same weights, one prompt at a time (no padding), greedy."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    refs = []
    for ids in _prompts(paged):
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )[0, len(ids) :].tolist()
        cut = next((i for i, t in enumerate(out) if t in paged.codec.eos_ids), len(out))
        refs.append(out[:cut])
    return refs


def _requests(prompts: list[list[int]], tag: str, tenant: str = "t") -> list[EngineRequest]:
    greedy = SamplingParams(max_tokens=MAX_TOKENS)
    return [
        EngineRequest(seq_id=f"{tag}-{i}", prompt_ids=p, params=greedy, tenant=tenant)
        for i, p in enumerate(prompts)
    ]


def test_fifty_prompts_cold_then_warm_cache(paged, references) -> None:
    prompts = _prompts(paged)
    assert len(prompts) == 50
    cold = run_to_completion(paged, _requests(prompts, "cold", "fifty"))
    assert [o.token_ids for o in cold] == references
    assert sum(o.cached_tokens for o in cold) > 0  # later jobs of a system prompt hit its blocks
    warm = run_to_completion(paged, _requests(prompts, "warm", "fifty"))  # prefixes cached now
    assert [o.token_ids for o in warm] == references
    assert all(o.cached_tokens >= 16 for o in warm[:48])
    assert paged.stats().blocks_used == 0  # every block released once all jobs finished


def test_cpu_fast_path_is_taken_and_the_torch_path_matches_too(
    paged, references, model_path
) -> None:
    """The default engine runs the lean forward on the C kernels; the transformers-modules
    path (CUDA, other models, no compiler) gives the same greedy tokens."""
    if native.library() is not None:
        assert paged.runner.lean is not None and paged.runner.native
    plain = PagedEngine(
        model_path, "plain", device="cpu", dtype="float32", config=EngineConfig(native=False)
    )
    assert plain.runner.lean is None and not plain.runner.native
    out = run_to_completion(plain, _requests(_prompts(plain), "plain"))
    assert [o.token_ids for o in out] == references


def test_shuffled_small_batches_and_other_tenant(paged, references) -> None:
    order = list(range(50))
    random.Random(7).shuffle(order)
    prompts = _prompts(paged)
    for start in range(0, 50, 7):
        chunk = order[start : start + 7]
        outs = run_to_completion(paged, _requests([prompts[i] for i in chunk], f"mix{start}", "o"))
        assert [o.token_ids for o in outs] == [references[i] for i in chunk]


def test_tenants_never_share_blocks(paged) -> None:
    prompt = _prompts(paged)[0]
    run_to_completion(paged, _requests([prompt], "a1", tenant="alice"))
    (again,) = run_to_completion(paged, _requests([prompt], "a2", tenant="alice"))
    (other,) = run_to_completion(paged, _requests([prompt], "b1", tenant="bob"))
    assert again.cached_tokens > 0 and other.cached_tokens == 0


def test_preemption_under_a_tiny_cache_keeps_outputs_exact(model_path, references) -> None:
    small = PagedEngine(
        model_path,
        "smollm2",
        device="cpu",
        dtype="float32",
        config=EngineConfig(kv_cache_tokens=16 * 24, max_num_seqs=8),
    )
    prompts = _prompts(small)[:12]
    outs = run_to_completion(small, _requests(prompts, "tiny"))
    assert [o.token_ids for o in outs] == references[:12]
    stats = small.stats()
    assert stats.blocks_used == 0
    assert sum(o.compute_s for o in outs) == pytest.approx(stats.busy_s, abs=1e-3)
    assert sum(o.computed_prompt_tokens for o in outs) == stats.prefill_tokens
    for o in outs:  # at least what it needed; a preempted one also recomputed (minus hits)
        fed = len(o.token_ids) + (o.finish_reason == "stop") - 1
        assert o.computed_tokens >= o.prompt_tokens - o.cached_tokens + fed


def test_step_time_is_split_over_jobs_by_tokens_computed(paged) -> None:
    """Each step's wall time goes to its sequences in proportion to the tokens computed for
    each; the jobs' compute seconds add up to the engine's busy time."""
    before = paged.stats()
    prompts = _prompts(paged)[:3] + _prompts(paged)[16:19]  # two system prompts
    outs = run_to_completion(paged, _requests(prompts, "charge", tenant="charge"))
    after = paged.stats()
    busy = after.busy_s - before.busy_s
    assert sum(o.compute_s for o in outs) == pytest.approx(busy, abs=1e-3)
    assert after.seq_steps - before.seq_steps == sum(len(o.token_ids) for o in outs) + sum(
        o.finish_reason == "stop" for o in outs
    )  # one sampled token per sequence per step (an eos is sampled, not kept)
    for o in outs:
        assert o.compute_s > 0
        assert o.computed_prompt_tokens == o.prompt_tokens - o.cached_tokens  # no preemption
