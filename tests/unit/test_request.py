"""One request from the wire to the engine: the job's params are the sampler's (one class, one
object), every request field is mapped by name, and the job id stays the job's UUID."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest
import torch

from api_client.schema import JobMessage
from api_client.wire import TASK_NAME
from inferq.params import EngineConfig, SamplingParams
from inferq.settings import Settings
from storage.records import utcnow
from worker.broker import Received
from worker.engine.api import EngineRequest
from worker.engine.null import ByteCodec
from worker.engine.sequence import EngineSequence
from worker.service.jobs import LiveJob
from worker.service.messages import Trust, read_job

#: A value other than the default for every sampling parameter (a new one must be added here).
SENT = {
    "max_tokens": 9,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 5,
    "seed": 11,
    "stop": ["\n\n", "END"],
}
ENGINE_ONLY = {"ignore_eos"}  # request fields no job sets (benchmarks' equal-work runs)
CODEC = ByteCodec()  # the sequence only keeps it; nothing here decodes


def _read(kwargs: dict) -> JobMessage:
    """`kwargs` sent as a queue message and read by the worker's reader."""
    body = json.dumps([[], kwargs, {}])
    headers = {"task": TASK_NAME, "id": str(uuid.uuid4())}
    job = read_job(Received(body, "application/json", headers, None), Trust(), utcnow())
    assert isinstance(job, JobMessage), job
    return job


def test_the_sampling_params_table_covers_every_field() -> None:
    assert set(SENT) == set(SamplingParams.model_fields)
    defaults = SamplingParams()
    assert all(getattr(defaults, name) != SENT[name] for name in SENT)


def test_every_sampling_param_sent_on_the_wire_reaches_the_sampler() -> None:
    """Wire JSON -> the worker's reader -> the intake's `LiveJob.from_job` -> the engine's
    sequence: every field arrives with the value sent, in the very object the wire made."""
    job_id = uuid.uuid4()
    sent = {"job_id": str(job_id), "tenant": "acme", "prompt": "hi", "priority": 4, "params": SENT}
    job = _read(sent)
    live = LiveJob.from_job(job, [1, 2, 3], model="m")
    seq = EngineSequence.start(live, CODEC, torch.device("cpu"), salt="s", arrival=0.0)
    assert seq.params is job.params
    assert seq.params.model_dump(mode="json") == SENT
    assert (seq.seq_id, seq.priority, seq.max_tokens) == (job_id, 4, SENT["max_tokens"])
    assert seq.generator is not None  # sampled with a seed: a generator of its own


def test_from_job_sets_every_request_field_by_name() -> None:
    """A field added to `EngineRequest` (or `LiveJob`) and not mapped from the job keeps its
    default: caught here, not by a job silently running with it."""
    job = _read({"tenant": "acme", "prompt": "hi", "priority": 4, "params": SENT})
    live = LiveJob.from_job(
        job, [7, 8], model="m", enqueued_at=utcnow(), stream=True, callback=True
    )
    unmapped = [
        f.name
        for f in dataclasses.fields(LiveJob)
        if f.name not in ENGINE_ONLY and getattr(live, f.name) == _default(f)
    ]
    assert unmapped == []
    assert live.seq_id == job.job_id and isinstance(live.seq_id, uuid.UUID)  # one id type
    assert isinstance(live, EngineRequest)  # what the engine is handed is the job itself


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else object()


def test_requests_are_built_by_keyword_only() -> None:
    params = SamplingParams()
    with pytest.raises(TypeError):
        EngineRequest("a", [1], params)  # type: ignore[misc]
    with pytest.raises(TypeError):
        EngineConfig(16)  # type: ignore[misc]


def test_settings_take_the_engines_defaults() -> None:
    """Each engine default is written once (`EngineConfig`); the service's settings read it,
    and `Settings.engine_config` carries every one of them into the engine."""
    engine, settings = EngineConfig(), Settings.model_fields
    shared = [f.name for f in dataclasses.fields(EngineConfig) if f.name in settings]
    assert {"block_size", "kernel_dir"} == {f.name for f in dataclasses.fields(EngineConfig)} - {
        *shared
    }
    for name in shared:
        if name != "cache_secret":  # random per process in the service
            assert settings[name].default == getattr(engine, name), name
    changed = {
        "native": False,
        "keep_heap": False,
        "gptq_crossover": "40",
        "gptq_many": "dense",
        "max_num_seqs": 7,
        "prefix_cache": False,
    }
    built = Settings(home=Path("/srv/inferq"), **changed).engine_config(max_step_tokens=99)
    assert {name: getattr(built, name) for name in changed} == changed
    assert (built.max_step_tokens, built.kernel_dir) == (99, "/srv/inferq/kernels")
