"""Models added with `inferq model add`, served by a worker by name: two tiny random-weight
models of different KV sizes share the worker's KV memory (equal tokens, logged at start),
and a job naming one gets transformers' greedy continuation."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_helpers import running_worker, wait_for
from transformers import AutoTokenizer

from api_client import InferqClient
from storage.repository import Repository
from tests.engine.tiny_models import config, reference, save
from worker.engine.memory import GIB
from worker.prep.registry import add_model

pytestmark = [pytest.mark.services]


def test_a_worker_serves_added_models_by_name_and_splits_kv_memory(
    service_settings, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    qwen3, llama = tmp_path / "qwen3", tmp_path / "llama2l"
    save(config("qwen3"), qwen3, chat=True)
    save(config("llama", num_hidden_layers=2), llama, chat=True)  # half the KV per token
    settings = service_settings.model_copy(
        update={"model": "byo-qwen", "models": "byo-llama", "kv_cache_gib": 0.03}
    )
    add_model(settings, "byo-qwen", qwen3)
    add_model(settings, "byo-llama", llama)
    with running_worker(settings, {}) as runtime:
        assert runtime.load_errors == {}
        qwen, small = runtime.engines["byo-qwen"], runtime.engines["byo-llama"]
        assert qwen.plan.block_bytes == 2 * small.plan.block_bytes
        assert qwen.plan.blocks == int(0.02 * GIB // qwen.plan.block_bytes)  # 2/3 of 0.03
        assert small.plan.blocks == int(0.01 * GIB // small.plan.block_bytes)
        assert abs(qwen.plan.tokens - small.plan.tokens) <= 16
        client = InferqClient(settings)
        prompt = "w5 w17 w33 w8 w250 w61 w19"
        job = client.submit(prompt, model="byo-qwen", params={"max_tokens": 10})
        views = wait_for(Repository(settings.database_url), [job])
    logged = "".join(capsys.readouterr())  # structlog's console or JSON lines
    split = [line for line in logged.splitlines() if "kv.split" in line]
    assert len(split) == 1 and all(w in split[0] for w in ("byo-llama", "byo-qwen", "kv_blocks"))
    view = views[job]
    assert view.status == "done" and view.model == "byo-qwen"
    tokenizer = AutoTokenizer.from_pretrained(qwen3)
    ids = tokenizer(prompt)["input_ids"]
    expected = reference(qwen3, [ids], 10)[0]
    assert tokenizer(view.result.text)["input_ids"] == expected
    assert view.result.completion_tokens == len(expected)
