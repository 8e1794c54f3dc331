"""GPTQ 4-bit: quantizing a tiny model, checkpoint checks with clear errors, and the paged
engine's greedy tokens against gptqmodel's own inference (tiny model and the default one)."""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_paged_engine import QUESTIONS as PAGED_QUESTIONS

from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine
from worker.engine.loading import GptqCheckpointError, check_checkpoint, load_causal_lm
from worker.prep.quantize import (
    CALIBRATION_FILE,
    GptqSpec,
    calibration_texts,
    pick_group_size,
    quantize,
)

model = pytest.mark.model
# logits: four bf16 steps at SmolLM2's top logits (16-32). Batched steps run the weights
# dequantized through a dense bf16 matmul (gptq_dispatch), whose sums go in another order
# than gptqmodel's int4 kernel: one of the 22 prompts then flips at a gap of 3 steps (0.375);
# with the int4 kernel everywhere (INFERQ_GPTQ_CROSSOVER=off) all flips are within 2.
TIE_GAP = 0.5
TINY_PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4", "def f(x):", "Q: why? A:"]
SYSTEM = (
    "You are a helpful assistant. Answer clearly and briefly, in plain English, and do not "
    "add any preamble or closing remarks to your answer."
)
QUESTIONS = [  # 22 chat prompts: the fp engine test's 16 and 6 more
    *PAGED_QUESTIONS,
    "Write a Python function that adds two numbers.",
    "Translate 'good morning' into French.",
    "What is photosynthesis?",
    "Tell me a short joke.",
    "How do I boil an egg?",
    "What year did the Second World War end?",
]


def _greedy(prompts: list[list[int]], max_tokens: int, tag: str) -> list[EngineRequest]:
    params = SamplingParams(max_tokens=max_tokens)
    return [
        EngineRequest(seq_id=f"{tag}-{i}", prompt_ids=p, params=params, tenant="t")
        for i, p in enumerate(prompts)
    ]


def _reference(wrapped, prompts: list[list[int]], max_tokens: int, eos: set[int]) -> list:
    """gptqmodel's own greedy generation, one prompt at a time, trailing EOS dropped."""
    refs = []
    for ids in prompts:
        out = wrapped.model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,  # gptqmodel forces generation_config.do_sample=True on load
        )[0, len(ids) :].tolist()
        refs.append(out[:-1] if out and out[-1] in eos else out)
    return refs


def _load_reference(path: str, engine: PagedEngine):
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(
        path, device="cpu", backend=BACKEND(engine.runner.kernel), dtype=engine.runner.dtype
    )


# -- a tiny random Llama, quantized once -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gptq(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer, quantized to 4-bit g32."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        initializer_range=0.3,  # wide logits: varied greedy tokens, no near-ties
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    root = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    spec = quantize(
        root / "src",
        root / "gptq",
        GptqSpec(group_size=32, sym=True, static_groups=False, samples=16, batch_size=8),
    )
    assert spec.group_size == 32
    return root / "gptq"


@model
def test_tiny_quantize_and_engine_matches_gptqmodel(tiny_gptq: Path) -> None:
    qc = json.loads((tiny_gptq / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 32, True)
    assert check_checkpoint(tiny_gptq)["group_size"] == 32
    generation = json.loads((tiny_gptq / "generation_config.json").read_text())
    assert generation.get("do_sample") is not True
    engine = PagedEngine(str(tiny_gptq), "tiny", "cpu", "auto")
    assert engine.runner.kernel.startswith("gptq_") and engine.runner.dtype == torch.bfloat16
    prompts = [engine.codec.encode(p, None) for p in TINY_PROMPTS]
    outs = run_to_completion(engine, _greedy(prompts, 12, "tiny"))
    wrapped = _load_reference(str(tiny_gptq), engine)
    ref = _reference(wrapped, prompts, 12, engine.codec.eos_ids)
    assert all(len(r) == 12 for r in ref) and len({tuple(r) for r in ref}) == len(ref)
    _assert_matches(wrapped, TINY_PROMPTS, prompts, outs, ref, min(engine.codec.eos_ids))


def _set_group_64(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64
    (d / "config.json").write_text(json.dumps(config))


def _truncate(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x00\x01\x02")


def _delete_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()
    assert not list(d.glob("*.safetensors"))


def _drop_scales(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.scales"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


@model
@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_set_group_64, r"model\.layers\.0\.mlp\.down_proj: scales \[4, 64\] do not match"),
        (_truncate, r"model\.safetensors is not a readable safetensors file"),
        (_delete_weights, r"no \.safetensors"),
        (_drop_scales, r"model\.layers\.1\.self_attn\.k_proj: missing scales"),
    ],
)
def test_broken_checkpoint_errors(
    tiny_gptq: Path, tmp_path: Path, breakage: Callable[[Path], None], message: str
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gptq, broken)
    breakage(broken)
    with pytest.raises(GptqCheckpointError, match=message):
        check_checkpoint(broken)
    with pytest.raises(GptqCheckpointError, match=message):
        load_causal_lm(str(broken), torch.device("cpu"))


@model
def test_auto_gptq_style_checkpoint_loads(tiny_gptq: Path, tmp_path: Path) -> None:
    """A standard checkpoint as auto-gptq wrote them: the quantize config only in
    quantize_config.json (minimal keys), none in config.json. Same greedy tokens as ours."""
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_gptq, legacy)
    config = json.loads((legacy / "config.json").read_text())
    qc = config.pop("quantization_config")
    (legacy / "config.json").write_text(json.dumps(config))
    keys = ("bits", "group_size", "desc_act", "sym", "true_sequential", "damp_percent")
    minimal = {k: qc.get(k, qc.get("meta", {}).get(k)) for k in keys}
    (legacy / "quantize_config.json").write_text(json.dumps(minimal))
    check_checkpoint(legacy)
    prompts = [TINY_PROMPTS[0]]
    outs = []
    for path in (tiny_gptq, legacy):
        engine = PagedEngine(str(path), "tiny", "cpu", "auto")
        assert engine.runner.kernel.startswith("gptq_")
        ids = [engine.codec.encode(p, None) for p in prompts]
        outs.append([o.token_ids for o in run_to_completion(engine, _greedy(ids, 12, "legacy"))])
    assert outs[0] == outs[1]


# -- pure helpers ------------------------------------------------------------------------


def test_pick_group_size() -> None:
    assert pick_group_size(576, 1536) == 32  # SmolLM2-135M
    assert pick_group_size(192, 384) == 32
    for hidden, inter in [(100, 300), (576, 100)]:
        with pytest.raises(GptqCheckpointError, match="does not divide"):
            pick_group_size(hidden, inter)


def test_calibration_texts_seeded_from_shipped_file() -> None:
    assert CALIBRATION_FILE.parts[-3:] == ("worker", "data", "calibration.jsonl")
    shipped = {json.loads(line)["text"] for line in CALIBRATION_FILE.read_text().splitlines()}
    first = calibration_texts(5, seed=1)
    assert len(first) == 5 and set(first) <= shipped
    assert calibration_texts(5, seed=1) == first
    assert calibration_texts(5, seed=2) != first


# -- the default model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_reference(gptq_model_path: str, gptq_engine: PagedEngine) -> Iterator:
    """gptqmodel's own load of the default model (same kernel and dtype), freed after."""
    wrapped = _load_reference(gptq_model_path, gptq_engine)
    yield wrapped
    wrapped.model = None  # pytest still holds the wrapper here: drop the weights it owns
    gc.collect()


def _chat(engine: PagedEngine, question: str, system: str | None = SYSTEM) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return engine.codec.encode(None, [*messages, {"role": "user", "content": question}])


@model
def test_default_model_knows_paris(gptq_engine: PagedEngine) -> None:
    prompt = _chat(gptq_engine, "What is the capital of France?", system=None)
    (out,) = run_to_completion(gptq_engine, _greedy([prompt], 24, "paris"))
    assert "Paris" in out.text


@model
def test_default_model_recipe_keeps_groups_consecutive(
    gptq_model_path: str, gptq_engine: PagedEngine
) -> None:
    """The default recipe (asymmetric, act-order with static groups) leaves every layer's
    groups on consecutive input columns, so no layer gathers its input at inference, and its
    config says desc_act: false (worker.prep.portable), as engines without act-order read."""
    from worker.engine.gptq_dispatch import DispatchLinear

    qc = json.loads((Path(gptq_model_path) / "config.json").read_text())["quantization_config"]
    assert (qc["sym"], qc["desc_act"], qc["meta"]["static_groups"]) == (False, False, True)
    layers = [m for m in gptq_engine.runner.model.modules() if isinstance(m, DispatchLinear)]
    assert len(layers) == 7 * 30 and all(m.rowmap is None for m in layers)


def _divergence(wrapped, prompt: list[int], ours: list[int], ref: list[int], eos: int):
    """First differing position; how far our pick is below the reference's (by its logits)."""
    pos = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), None)
    pos = min(len(ours), len(ref)) if pos is None else pos
    with torch.inference_mode():
        logits = wrapped.model(input_ids=torch.tensor([prompt + ref[:pos]])).logits[0, -1].float()
    picked = ours[pos] if pos < len(ours) else eos
    gap = float(logits.max() - logits[picked])
    top = logits.topk(2)
    return pos, gap, f"pos {pos}: ours {picked}, ref top-2 {top.indices.tolist()} {top.values}"


@model
def test_default_model_batched_matches_gptqmodel(gptq_engine: PagedEngine, gptq_reference) -> None:
    """Exact equality is not attainable in bf16 (the CPU int4 kernels take no fp32): top-2
    logits tie often at bf16's 0.125 step, and gptqmodel's own greedy with and without its
    KV cache disagrees on several of these prompts. So divergences must be such ties."""
    prompts = [_chat(gptq_engine, q) for q in QUESTIONS]
    outs = run_to_completion(gptq_engine, _greedy(prompts, 24, "batch"))
    assert sum(o.cached_tokens for o in outs) > 0  # the shared system prompt hit the cache
    eos = gptq_engine.codec.eos_ids
    refs = _reference(gptq_reference, prompts, 24, eos)
    _assert_matches(gptq_reference, QUESTIONS, prompts, outs, refs, min(eos))


def _assert_matches(
    wrapped, labels: list[str], prompts, outs, refs, eos: int, tie_gap: float = TIE_GAP
) -> None:
    """Tokens are identical up to the first divergence, and there our pick is a near-tie
    (within `tie_gap`) of the best token by the reference's own full-forward logits."""
    diffs = {
        labels[i]: _divergence(wrapped, prompts[i], o.token_ids, refs[i], eos)
        for i, o in enumerate(outs)
        if o.token_ids != refs[i]
    }
    report = f"{len(diffs)}/{len(prompts)} differ:\n" + "\n".join(
        f"{q!r} gap {gap} {where}" for q, (_, gap, where) in diffs.items()
    )
    print(report)
    assert all(gap <= tie_gap for _, gap, _ in diffs.values()), report
