"""One worker, several models: the GPTQ default served end to end beside the fp model, and a
broken checkpoint that makes the worker not ready (its jobs wait on the queue for a worker
that loads it) while the other models keep serving."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from service_helpers import producer, running_worker, wait_for

from api_client import InferqClient
from inferq.settings import DEFAULT_MODEL, FP_MODEL
from storage.repository import Repository

pytestmark = [pytest.mark.model, pytest.mark.services]


def _mismatched_copy(gptq_dir: str, dst: Path) -> Path:
    """The GPTQ checkpoint with a quantize config that no longer matches its tensors."""
    dst.mkdir()
    for item in Path(gptq_dir).iterdir():
        if item.name != "config.json" and item.is_file():
            (dst / item.name).symlink_to(item)
    config = json.loads((Path(gptq_dir) / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_worker_serves_gptq_beside_fp_and_survives_a_broken_checkpoint(
    service_settings, paged_engine, gptq_model_path: str, tmp_path: Path
) -> None:
    broken = _mismatched_copy(gptq_model_path, tmp_path / "broken")
    settings = service_settings.model_copy(
        update={
            "models": f"{DEFAULT_MODEL}={gptq_model_path}, broken={broken}, gone",
            "kv_cache_tokens": 4096,
        }
    )
    with running_worker(settings, {FP_MODEL: paged_engine}) as runtime:
        assert sorted(runtime.engines) == [FP_MODEL, DEFAULT_MODEL]
        assert "scales" in runtime.load_errors["broken"]
        assert "unknown model 'gone'" in runtime.load_errors["gone"]
        assert runtime.engines[DEFAULT_MODEL].runner.kernel.startswith("gptq_")
        client = InferqClient(settings)
        paris = [{"role": "user", "content": "What is the capital of France?"}]
        ids = [
            client.submit(messages=paris, model=DEFAULT_MODEL, params={"max_tokens": 16}),
            client.submit(messages=paris, params={"max_tokens": 16}),  # the worker's default
            client.submit("Hello", model="broken"),
            client.submit("Hello", model="gone"),
        ]
        producer(settings).send_task(  # a plain send_task naming the GPTQ model works too
            "inferq.generate",
            queue=settings.queue,
            kwargs={"job_id": str(raw := uuid.uuid4()), "prompt": "Hi", "model": DEFAULT_MODEL},
        )
        repo = Repository(settings.database_url)
        views = wait_for(repo, [ids[0], ids[1], raw])
        assert not runtime.ready()  # two models it was told to serve did not load
        waiting = repo.get_many(ids[2:])  # held and given back: never recorded, never failed
        assert [client.get(i) for i in ids[2:]] == [None, None]  # still queued
    gptq, fp = views[ids[0]], views[ids[1]]
    assert gptq.status == fp.status == views[raw].status == "done"
    assert "Paris" in gptq.result.text and "Paris" in fp.result.text
    assert (gptq.model, fp.model, views[raw].model) == (DEFAULT_MODEL, FP_MODEL, DEFAULT_MODEL)
    assert "do not match" in runtime.load_errors["broken"]
    assert "group size 64" in runtime.load_errors["broken"]
    assert waiting == {}
    shutil.rmtree(broken)
