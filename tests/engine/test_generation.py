"""The paged engine on the real model (fp32, CPU) against HF `generate`: finish reasons, stop
strings, seeded sampling and the per-output accounting of the `Engine` contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.engine.api import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingParams,
    run_to_completion,
)
from worker.engine.engine import PagedEngine

pytestmark = pytest.mark.model


@dataclass(frozen=True)
class Case:
    prompt: str | None
    messages: list[dict] | None
    max_tokens: int


CASES = [
    Case(None, [{"role": "user", "content": "What is the capital of France?"}], 24),  # ends on eos
    Case("The quick brown fox", None, 20),
    Case(
        None,
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colors."},
        ],
        10,
    ),
    Case("Once upon a time, in a small village by the sea, there lived", None, 12),
    Case("1, 2, 3, 4,", None, 16),
    Case(None, [{"role": "user", "content": "Say hi."}], 6),
]
FOX = 1  # a raw prompt whose greedy continuation has a "." and a newline
STORY = 3  # a prompt with a spread-out next-token distribution


@dataclass(frozen=True)
class Ref:
    prompt_ids: list[int]
    max_tokens: int
    tokens: list[int]  # HF greedy output, eos and anything after it stripped
    hit_eos: bool


def _req(
    seq_id: str, ids: list[int], tenant: str = "gen", ignore_eos: bool = False, **sampling: Any
) -> EngineRequest:
    params = SamplingParams(**sampling)
    return EngineRequest(
        seq_id=seq_id, prompt_ids=ids, params=params, tenant=tenant, ignore_eos=ignore_eos
    )


def generate(engine: PagedEngine, reqs: list[EngineRequest]) -> list[EngineOutput]:
    return run_to_completion(engine, reqs)


@pytest.fixture(scope="module")
def engine(paged_engine: PagedEngine) -> PagedEngine:
    return paged_engine


@pytest.fixture(scope="module")
def refs(engine: PagedEngine, model_path: str) -> list[Ref]:
    """Each case run alone through HF `generate(do_sample=False)` on the same weights."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    for case in CASES:
        ids = engine.codec.encode(case.prompt, case.messages)
        x = torch.tensor([ids])
        with torch.inference_mode():
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=case.max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=engine.codec.pad_id,
            )
        new = gen[0, len(ids) :].tolist()
        cut = next((i for i, t in enumerate(new) if t in engine.codec.eos_ids), None)
        tokens = new if cut is None else new[:cut]
        out.append(Ref(ids, case.max_tokens, tokens, cut is not None))
    return out


@pytest.fixture(scope="module")
def full_batch(engine, refs):
    """All cases greedy, added together on a fresh tenant: (outputs, stats before, after)."""
    reqs = [_req(str(i), r.prompt_ids, "full", max_tokens=r.max_tokens) for i, r in enumerate(refs)]
    before = engine.stats()
    outputs = generate(engine, reqs)
    return outputs, before, engine.stats()


def _run(engine, refs: list[Ref], order: list[int], tenant: str) -> dict[int, list[int]]:
    reqs = [_req(str(i), refs[i].prompt_ids, tenant, max_tokens=refs[i].max_tokens) for i in order]
    outputs = generate(engine, reqs)
    assert [o.seq_id for o in outputs] == [str(i) for i in order]
    return {i: o.token_ids for i, o in zip(order, outputs, strict=True)}


# -- greedy equivalence ----------------------------------------------------------------


def test_cases_are_varied(refs) -> None:
    assert len({len(r.prompt_ids) for r in refs}) == len(refs)  # all prompt lengths differ
    assert any(r.hit_eos for r in refs) and not all(r.hit_eos for r in refs)


def test_greedy_batch_matches_hf_generate(engine, refs, full_batch) -> None:
    outputs, _, _ = full_batch
    for i, (ref, out) in enumerate(zip(refs, outputs, strict=True)):
        assert out.seq_id == str(i)
        assert out.token_ids == ref.tokens, f"case {i}"
        assert out.prompt_tokens == len(ref.prompt_ids)
        assert out.finish_reason == (FinishReason.STOP if ref.hit_eos else FinishReason.LENGTH)
        assert out.text == engine.codec.decode(ref.tokens)
        assert out.added_at <= out.admitted_at <= out.first_token_at <= out.finished_at


def test_greedy_does_not_depend_on_batch_composition(engine, refs) -> None:
    got: dict[int, list[int]] = {}
    for n, order in enumerate(([5, 3], [4, 0, 2, 1])):  # other neighbours and positions
        got.update(_run(engine, refs, order, f"compose{n}"))
    assert got == {i: r.tokens for i, r in enumerate(refs)}


def _fed(out) -> int:
    """Generated tokens fed back through the model: every sampled token but the last
    (an eos that ends a sequence is sampled, not kept, and also not fed)."""
    sampled = len(out.token_ids) + (out.finish_reason == FinishReason.STOP)
    return sampled - 1


def test_outputs_account_for_computed_tokens_and_batches(full_batch, refs) -> None:
    outputs, before, after = full_batch
    for o in outputs:  # the cache is big: nobody is preempted, so nothing is recomputed
        assert o.computed_tokens == o.prompt_tokens - o.cached_tokens + _fed(o)
    computed = after.computed_tokens - before.computed_tokens
    assert computed == sum(o.computed_tokens for o in outputs)
    assert after.steps > before.steps
    assert after.busy_s > before.busy_s and after.running == after.waiting == 0
    assert after.blocks_used == 0
    by_batch: dict[int, int] = {}
    for o in outputs:
        by_batch[o.batch] = by_batch.get(o.batch, 0) + 1
    assert all(o.batch > before.steps and o.batch_size == by_batch[o.batch] for o in outputs)


def test_identical_prompts_share_their_prefix(engine, refs) -> None:
    ids = refs[0].prompt_ids  # a chat prompt of more than one block
    assert len(ids) > 16
    a, b = generate(
        engine, [_req("a", ids, "twins", max_tokens=4), _req("b", ids, "twins", max_tokens=2)]
    )
    assert a.token_ids == refs[0].tokens[:4] and b.token_ids == refs[0].tokens[:2]
    assert a.cached_tokens == 0 and b.cached_tokens == (len(ids) - 1) // 16 * 16
    assert b.batch == a.batch + 1  # b waits one step for a's prefix, then shares it
    assert a.computed_tokens == len(ids) + _fed(a)
    assert b.computed_tokens == len(ids) - b.cached_tokens + _fed(b)


# -- finish reasons and stop strings -----------------------------------------------------


def test_finish_reason_length_and_eos(engine, refs) -> None:
    eos_case = next(i for i, r in enumerate(refs) if r.hit_eos)
    ref = refs[eos_case]
    room = len(ref.tokens) + 4
    short = 3
    outputs = generate(
        engine,
        [
            _req("eos", ref.prompt_ids, max_tokens=room),
            _req("cut", ref.prompt_ids, max_tokens=short),
        ],
    )
    assert outputs[0].finish_reason == FinishReason.STOP
    assert outputs[0].token_ids == ref.tokens
    assert not set(outputs[0].token_ids) & engine.codec.eos_ids
    assert outputs[1].finish_reason == FinishReason.LENGTH
    assert outputs[1].token_ids == ref.tokens[:short]


def test_ignore_eos_runs_to_max_tokens(engine, refs) -> None:
    """Equal-work benchmarks: the sampled EOS is kept and generation goes on."""
    ref = refs[next(i for i, r in enumerate(refs) if r.hit_eos)]
    room = len(ref.tokens) + 4
    (out,) = generate(engine, [_req("no-eos", ref.prompt_ids, max_tokens=room, ignore_eos=True)])
    assert out.finish_reason == FinishReason.LENGTH and len(out.token_ids) == room
    assert out.token_ids[: len(ref.tokens)] == ref.tokens
    assert out.token_ids[len(ref.tokens)] in engine.codec.eos_ids


def test_stop_strings_truncate_before_the_earliest_stop(engine, refs) -> None:
    ref = refs[FOX]
    decode = engine.codec.decode
    full = decode(ref.tokens)
    dot, newline = full.find("."), full.find("\n")
    assert 0 < dot < newline, full  # the case relies on "." before a newline
    # the fewest tokens whose text contains "."
    need = next(n for n in range(1, len(ref.tokens) + 1) if "." in decode(ref.tokens[:n]))
    outputs = generate(
        engine,
        [
            _req("dot", ref.prompt_ids, max_tokens=ref.max_tokens, stop=(".",)),
            _req("both", ref.prompt_ids, max_tokens=ref.max_tokens, stop=("\n", ".")),
            _req("nl", ref.prompt_ids, max_tokens=ref.max_tokens, stop=("\n",)),
            _req("none", ref.prompt_ids, max_tokens=ref.max_tokens, stop=("zq#never",)),
        ],
    )
    by_id = {o.seq_id: o for o in outputs}
    for key in ("dot", "both"):
        assert by_id[key].text == full[:dot]
        assert by_id[key].finish_reason == FinishReason.STOP
        assert by_id[key].token_ids == ref.tokens[:need]
    assert by_id["nl"].text == full[:newline]
    assert by_id["nl"].finish_reason == FinishReason.STOP
    assert len(by_id["nl"].token_ids) < ref.max_tokens
    assert by_id["none"].text == full
    assert by_id["none"].finish_reason == FinishReason.LENGTH
    assert by_id["none"].token_ids == ref.tokens


def test_capital_of_france(engine) -> None:
    ids = engine.codec.encode(None, [{"role": "user", "content": "What is the capital of France?"}])
    (out,) = generate(engine, [_req("q", ids, max_tokens=16)])
    assert "Paris" in out.text


def test_too_long_and_duplicate_requests_are_refused(engine, refs) -> None:
    ids = refs[FOX].prompt_ids
    with pytest.raises(ValueError):
        engine.add(_req("long", ids, max_tokens=engine.max_context))
    engine.add(_req("dup", ids, max_tokens=2))
    with pytest.raises(ValueError):
        engine.add(_req("dup", ids, max_tokens=2))
    engine.abort("dup")
    assert not engine.has_work


def test_new_codec_is_a_separate_equal_tokenizer(engine) -> None:
    codec = engine.new_codec()
    assert codec is not engine.codec and codec.tokenizer is not engine.codec.tokenizer
    msgs = [{"role": "user", "content": "Hi there"}]
    assert codec.encode(None, msgs) == engine.codec.encode(None, msgs)
    assert (codec.eos_ids, codec.pad_id) == (engine.codec.eos_ids, engine.codec.pad_id)


# -- seeded sampling -------------------------------------------------------------------

SAMPLED = {"max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "top_k": 40}


def test_seeded_sampling_is_reproducible_across_runs_and_positions(engine, refs) -> None:
    story, fox = refs[STORY].prompt_ids, refs[FOX].prompt_ids
    (alone,) = generate(engine, [_req("a", story, seed=1234, **SAMPLED)])
    again = generate(
        engine,
        [
            _req("g", fox, max_tokens=4),
            _req("x", fox, seed=1234, **SAMPLED),
            _req("a", story, seed=1234, **SAMPLED),
            _req("y", story, seed=99, **SAMPLED),
        ],
    )
    assert len(alone.token_ids) == SAMPLED["max_tokens"]
    assert again[2].token_ids == alone.token_ids
    assert again[2].text == alone.text
    assert again[0].token_ids == refs[FOX].tokens[:4]  # greedy neighbour unaffected


def test_different_seeds_differ(engine, refs) -> None:
    story = refs[STORY].prompt_ids
    seeds = [1, 2, 3, 4, 5]
    outputs = generate(engine, [_req(str(s), story, seed=s, **SAMPLED) for s in seeds])
    distinct = {tuple(o.token_ids) for o in outputs}
    assert len(distinct) >= 3, distinct  # five seeds: identical outputs would be no sampling


def test_temperature_zero_ignores_seed(engine, refs) -> None:
    ref = refs[STORY]
    outputs = generate(
        engine,
        [
            _req("a", ref.prompt_ids, max_tokens=ref.max_tokens, temperature=0, seed=1),
            _req("b", ref.prompt_ids, max_tokens=ref.max_tokens, temperature=0, seed=2, top_k=5),
        ],
    )
    assert [o.token_ids for o in outputs] == [ref.tokens, ref.tokens]
