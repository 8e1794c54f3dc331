"""`inferq model add NAME PATH`: tiny random-weight models saved to temporary directories,
added under a name (JSON under INFERQ_HOME), listed, resolved by name and served token-exact
against transformers' greedy `generate`; each refusal with its reason; the KV cache that
follows from the memory setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from inferq.cli import main
from inferq.params import EngineConfig
from inferq.settings import DEFAULT_MODEL, Settings
from tests.engine.tiny_models import VOCAB, config, reference, save
from worker.engine import memory
from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine
from worker.engine.families import UnsupportedModelError
from worker.prep.models import resolve_model
from worker.prep.registry import ModelCheckError, add_model, remove_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[(7 * i + 3 * j) % (VOCAB - 3) + 3 for j in range(n)] for i, n in ((1, 9), (2, 30))]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 (q/k norms) with a chat template."""
    path = tmp_path_factory.mktemp("byo") / "qwen3"
    save(config("qwen3"), path, chat=True)
    return path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", device="cpu", kv_cache_gib=0.01)


def _copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*names))
    return dst


def test_an_added_model_is_served_by_name_token_exact(settings: Settings, qwen3: Path) -> None:
    entry = add_model(settings, "my-qwen", qwen3)
    assert entry["model_type"] == "qwen3" and entry["quantization"] == "none"
    assert entry["dtype"] == "float32" and entry["kv_bytes_per_token"] == 2 * 4 * 2 * 32 * 4
    stored = json.loads(settings.model_registry.read_text())["models"]
    assert stored["my-qwen"]["path"] == str(qwen3.resolve())

    path = resolve_model(settings, "my-qwen")
    assert path == str(qwen3.resolve())
    engine = PagedEngine(path, "my-qwen", "cpu", "float32", settings.engine_config())
    greedy = SamplingParams(max_tokens=10)
    requests = [
        EngineRequest(seq_id=f"r{i}", prompt_ids=p, params=greedy) for i, p in enumerate(PROMPTS)
    ]
    outputs = run_to_completion(engine, requests)
    assert [o.token_ids for o in outputs] == reference(qwen3, PROMPTS, 10)
    assert engine.codec.encode(None, [{"role": "user", "content": "w5 w6"}]) == [5, 6]


def test_the_memory_setting_sets_the_block_count(settings: Settings, qwen3: Path) -> None:
    """Blocks = GiB over (16 tokens x 4 layers x 2 KV heads x 32 x K and V x fp32)."""
    block = 16 * 2 * 4 * 2 * 32 * 4
    sizes = {}
    for gib in (0.01, 0.03):
        cfg = settings.engine_config(kv_cache_gib=gib)
        engine = PagedEngine(str(qwen3), "q", "cpu", "float32", cfg)
        sizes[gib] = engine.kv.num_blocks
        assert engine.runner.kv.k.shape[2] == sizes[gib] * 16
        assert engine.plan.step_tokens == min(cfg.max_step_tokens, sizes[gib] * 16)
    assert sizes == {0.01: int(0.01 * memory.GIB // block), 0.03: int(0.03 * memory.GIB // block)}
    assert sizes[0.03] > 2 * sizes[0.01]


def test_list_and_remove(settings: Settings, qwen3: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("INFERQ_HOME", str(settings.home))
    monkeypatch.setenv("INFERQ_KV_CACHE_GIB", "0.01")
    assert main(["model", "add", "mine", str(qwen3)]) == 0
    assert json.loads(capsys.readouterr().out)["mine"]["model_type"] == "qwen3"
    assert main(["model", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mine"]["source"] == "added" and rows[DEFAULT_MODEL]["source"] == "built-in"
    assert main(["model", "add", "mine", str(qwen3)]) == 1
    assert "already added (--replace" in capsys.readouterr().err
    assert main(["model", "add", "mine", str(qwen3), "--replace"]) == 0
    assert remove_model(settings, "mine") and not remove_model(settings, "mine")
    assert settings.registered_models() == {}


def test_a_moved_directory_is_named_at_resolve(settings: Settings, qwen3: Path, tmp_path) -> None:
    moved = shutil.copytree(qwen3, tmp_path / "moved")
    add_model(settings, "moved", moved)
    shutil.rmtree(moved)
    with pytest.raises(ValueError, match="no longer a Hugging Face model directory"):
        resolve_model(settings, "moved")


def test_refusals_say_why(settings: Settings, qwen3: Path, tmp_path: Path) -> None:
    def refused(name: str, path: Path, error: type[Exception], match: str) -> None:
        with pytest.raises(error, match=match):
            add_model(settings, name, path)

    refused("../x", qwen3, ModelCheckError, "1 to 64 letters")
    refused(DEFAULT_MODEL, qwen3, ModelCheckError, "is a built-in model")
    refused("empty", tmp_path, ModelCheckError, "no config.json")
    neox = tmp_path / "neox"
    save(transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                    num_attention_heads=2), neox, chat=True)  # fmt: skip
    refused("neox", neox, UnsupportedModelError, r"'gpt_neox' \(GPTNeoXForCausalLM\)")
    no_tok = _copy_without(qwen3, tmp_path / "no-tok", "tokenizer*", "special_tokens*", "chat*")
    refused("no-tok", no_tok, ModelCheckError, "no usable tokenizer")
    no_chat = tmp_path / "no-chat"
    save(config("qwen3"), no_chat)
    refused("no-chat", no_chat, ModelCheckError, "no chat template")
    no_weights = _copy_without(qwen3, tmp_path / "no-weights", "*.safetensors")
    refused("no-weights", no_weights, ModelCheckError, r"no weights \(\*.safetensors")
    awq = shutil.copytree(qwen3, tmp_path / "awq")
    cfg = json.loads((awq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (awq / "config.json").write_text(json.dumps(cfg))
    refused("awq", awq, ModelCheckError, "quantization 'awq' is not served here")
    assert settings.registered_models() == {}


def test_a_model_that_does_not_fit_is_refused(settings: Settings, qwen3: Path, monkeypatch):
    weights = memory.weights_bytes(qwen3, 4, quantized=False)
    monkeypatch.setattr(memory, "free_memory", lambda device: weights)
    with pytest.raises(MemoryError, match=r"its weights take 0.00 GiB in float32"):
        add_model(settings, "big", qwen3)
    monkeypatch.setattr(memory, "free_memory", lambda device: weights + 64 * 1024)
    with pytest.raises(MemoryError, match=r"weights 0.00 GiB, then the KV cache gets 0 blocks"):
        add_model(settings, "big", qwen3)
    assert settings.registered_models() == {}
    big = EngineConfig(kv_cache_gib=1000)
    assert memory.plan_kv(memory.ModelShape.read(qwen3), 4, big, 64 * memory.GIB).capped
