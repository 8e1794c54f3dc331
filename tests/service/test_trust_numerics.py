"""Issue 25, finding 5 (numerics) on the real model: a tiny temperature is clamped and runs;
a row whose distribution is not finite fails that job alone, with no rerun of the batch."""

from __future__ import annotations

import time
import uuid

import pytest
import sqlalchemy as sa
from service_helpers import producer, wait_for

import worker.engine.engine as engine_module
from inferq.params import MIN_TEMPERATURE
from worker.engine.api import SamplingParams, run_to_completion
from worker.service.engine_loop import EngineLoop
from worker.service.jobs import LiveJob
from worker.service.metrics import Metrics
from worker.service.outcomes import Failed, Finished

pytestmark = [pytest.mark.model, pytest.mark.services]
POISON_SEED = 424_242  # marks the greedy request whose logits row is made NaN


def _job(engine, prompt: str, tenant: str, params: SamplingParams) -> LiveJob:
    ids = engine.new_codec().encode(prompt, None)
    model = engine.model_name
    return LiveJob(seq_id=uuid.uuid4(), prompt_ids=ids, params=params, tenant=tenant, model=model)


def _jobs(engine, tenant: str) -> list[LiveJob]:
    prompts = ["Say one.", "Name a colour.", "Count to three.", "Hello there."]
    return [_job(engine, p, tenant, SamplingParams(max_tokens=6)) for p in prompts]


def test_non_finite_row_fails_only_its_job_without_rerunning_the_batch(
    paged_engine, monkeypatch
) -> None:
    baseline = [o.token_ids for o in run_to_completion(paged_engine, _jobs(paged_engine, "a"))]
    real_sample = engine_module.sample_verified

    def poisoning_sample(logits, params, generators, drafts):
        logits = logits.clone()  # an inference tensor: not writable out here
        row = 0
        for p, draft in zip(params, drafts, strict=True):  # 1 + len(draft) rows each
            if p.seed == POISON_SEED:
                logits[row : row + 1 + len(draft)] = float("nan")
            row += 1 + len(draft)
        return real_sample(logits, params, generators, drafts)

    monkeypatch.setattr(engine_module, "sample_verified", poisoning_sample)
    isolated: list[str] = []
    real_isolate = EngineLoop._isolate

    def recording_isolate(self, name, engine, exc):
        isolated.append(repr(exc))
        real_isolate(self, name, engine, exc)

    monkeypatch.setattr(EngineLoop, "_isolate", recording_isolate)
    outcomes: list = []
    loop = EngineLoop({paged_engine.model_name: paged_engine}, outcomes.append, Metrics())
    clean = _jobs(paged_engine, "b")
    tiny = SamplingParams.model_construct(max_tokens=6, temperature=1e-45, seed=1)  # unvalidated
    bad = {
        "nan": _job(paged_engine, "Say two.", "b", SamplingParams(max_tokens=6, seed=POISON_SEED)),
        "tiny": _job(paged_engine, "Say three.", "b", tiny),
    }
    names = {job.seq_id: name for name, job in bad.items()}
    jobs = clean + list(bad.values())
    for job in jobs:
        loop.submit(job)
    loop.start()
    try:
        deadline = time.monotonic() + 120
        while len([o for o in outcomes if isinstance(o, Finished | Failed)]) < len(jobs):
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.05)
    finally:
        loop.stop(30)
    assert isolated == []  # nothing was rerun
    failed = {names[o.job_id]: o.error for o in outcomes if isinstance(o, Failed)}
    assert set(failed) == {"nan", "tiny"}
    assert all("not finite" in error for error in failed.values())
    done = {o.job.seq_id: o.output.token_ids for o in outcomes if isinstance(o, Finished)}
    assert [done[job.seq_id] for job in clean] == baseline
    assert not paged_engine.has_work and paged_engine.kv.stats().num_used == 0


def test_tiny_temperature_job_is_clamped_and_done(service_settings, fp_worker) -> None:
    """Raw `send_task` messages (no client-side validation) with 1e-300 and 1e-45."""
    ids = [uuid.uuid4() for _ in range(2)]
    for job_id, t in zip(ids, (1e-300, 1e-45), strict=True):
        producer(service_settings).send_task(
            "inferq.generate",
            queue=service_settings.queue,
            kwargs={
                "job_id": str(job_id),
                "prompt": "Say hi.",
                "params": {"max_tokens": 4, "temperature": t, "seed": 3},
            },
        )
    views = wait_for(fp_worker.repo, ids)
    assert [views[i].status for i in ids] == ["done", "done"], [views[i].error for i in ids]
    with fp_worker.repo.engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT params FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}
        ).scalars()
        assert [p["temperature"] for p in stored] == [MIN_TEMPERATURE] * 2
