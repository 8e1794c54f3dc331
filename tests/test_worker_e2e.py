"""The whole path on real Redis + PostgreSQL + the real model, with an in-process worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker

from api_client import InferqClient
from storage.repository import Repository
from worker.celery_app import create_app
from worker.engine_api import EngineRequest, StreamingEngine
from worker.runtime import WorkerRuntime

pytestmark = [pytest.mark.model, pytest.mark.services]


class CrashingEngine:
    """The real engine, except that any batch holding a poisoned job raises."""

    def __init__(self, engine, poison: str):
        self.inner, self.poison, self.calls = engine, poison, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def poisoned(self, prompts: list[list[int]]) -> bool:
        return any(self.poison in self.inner.codec.decode(p) for p in prompts)

    def generate(self, requests: list[EngineRequest]):
        self.calls += 1
        if self.poisoned([r.prompt_ids for r in requests]):
            raise RuntimeError("simulated kernel failure")
        return self.inner.generate(requests)


class CrashingPagedEngine(CrashingEngine):
    """The paged engine, whose step raises while a poisoned job is running."""

    def step(self):
        live = [lv.progress.req.prompt_ids for lv in self.inner._live.values()]
        if self.poisoned(live):
            self.calls += 1
            raise RuntimeError("simulated kernel failure")
        return self.inner.step()


class FlakyRepository(Repository):
    """The real repository, except that the first `start_batch` fails (database blip)."""

    failures = 0

    def start_batch(self, *args, **kwargs):
        if not self.failures:
            self.failures += 1
            raise RuntimeError("simulated database outage")
        return super().start_batch(*args, **kwargs)


@contextmanager
def _worker(settings, engine, repo: Repository | None = None) -> Iterator[Celery]:
    app = create_app(settings)
    app.inferq_runtime = WorkerRuntime(settings, engine=engine, repo=repo)
    try:
        with start_worker(
            app,
            pool="threads",
            concurrency=16,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=10,
        ):
            yield app
    finally:
        app.inferq_runtime.close()


@pytest.fixture
def worker_app(service_settings, paged_engine) -> Iterator[Celery]:
    with _worker(service_settings, paged_engine) as app:
        yield app


def _wait_for(repo: Repository, ids: list[uuid.UUID], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = repo.get_many(ids)
        if len(views) == len(ids) and all(
            v.status in ("done", "failed", "cancelled") for v in views.values()
        ):
            return views
        time.sleep(0.1)
    raise AssertionError(f"jobs not finished: {repo.statuses(ids)}")


def _letters_since(repo: Repository, since: datetime) -> list[dict]:
    return [d for d in repo.dead_letters() if d["received_at"] >= since]


def _producer(settings) -> Celery:
    """A bare Celery producer, as a backend app without our client would have."""
    return Celery("backend-app", broker=settings.broker_url, set_as_current=False)


def test_client_to_postgres_full_path(service_settings, any_engine) -> None:
    with _worker(service_settings, any_engine):
        _full_path(service_settings)


def _full_path(service_settings) -> None:
    client = InferqClient(service_settings)
    questions = [
        "What is the capital of France?",
        "Name a color.",
        "What is 2 plus 2?",
        "Write one word about the sea.",
        "Say hello.",
        "What is the capital of Italy?",
    ]
    ids = client.submit_many(
        {"messages": [{"role": "user", "content": q}], "params": {"max_tokens": 16}}
        for q in questions
    )
    views = client.wait_many(ids, timeout=120)
    assert [v.status for v in views] == ["done"] * len(ids)
    assert "Paris" in views[0].result.text
    for v in views:
        assert v.result.completion_tokens > 0 and v.result.prompt_tokens > 10
        assert v.metrics.queue_wait_s >= 0 and v.metrics.ttft_s >= v.metrics.queue_wait_s
        assert v.metrics.total_s >= v.metrics.ttft_s and v.attempts == 1 and v.worker
    # the question teams ask with plain SQL: what did it do, how long did it wait
    with client.repo.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT j.status, r.completion_tokens, m.queue_wait_s, b.size, b.padded_tokens "
                "FROM jobs j JOIN results r ON r.job_id = j.id "
                "JOIN job_metrics m ON m.job_id = j.id "
                "JOIN batches b ON b.id = j.batch_id WHERE j.id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
    assert len(rows) == len(ids)
    assert max(r.size for r in rows) > 1, "jobs were not micro-batched"
    assert all(r.padded_tokens > 0 for r in rows)


def test_raw_send_task_with_documented_kwargs(service_settings, worker_app) -> None:
    producer = _producer(service_settings)
    full_id, minimal_id = uuid.uuid4(), uuid.uuid4()
    producer.send_task(
        "inferq.generate",
        queue=service_settings.queue,
        kwargs={
            "job_id": str(full_id),
            "tenant": "acme",
            "model": "smollm2-135m-instruct",
            "messages": [
                {"role": "user", "content": "What is the capital of France?"},
            ],
            "params": {
                "max_tokens": 12,
                "temperature": 0,
                "top_p": 1.0,
                "top_k": 0,
                "seed": None,
                "stop": [],
            },
            "priority": 3,
            "idempotency_key": "order-42",
            "submitted_at": "2026-11-22T12:00:00Z",
        },
    )
    producer.send_task(
        "inferq.generate",
        queue=service_settings.queue,
        kwargs={"job_id": str(minimal_id), "prompt": "The sky is"},
    )
    repo = Repository(service_settings.database_url)
    views = _wait_for(repo, [full_id, minimal_id])
    assert views[full_id].status == "done" and "Paris" in views[full_id].result.text
    assert views[full_id].tenant == "acme" and views[full_id].idempotency_key == "order-42"
    assert views[minimal_id].status == "done" and views[minimal_id].tenant == "default"


def test_bad_input_fails_clearly_and_worker_keeps_serving(service_settings, worker_app) -> None:
    producer, repo = _producer(service_settings), Repository(service_settings.database_url)
    q, started = service_settings.queue, datetime.now(UTC)
    unknown, oversized, invalid, good = (uuid.uuid4() for _ in range(4))
    producer.send_task(
        "inferq.generate",
        queue=q,
        kwargs={"job_id": str(unknown), "prompt": "hi", "model": "no-such-model"},
    )
    producer.send_task(
        "inferq.generate", queue=q, kwargs={"job_id": str(oversized), "prompt": "word " * 3000}
    )
    producer.send_task(
        "inferq.generate",
        queue=q,
        kwargs={"job_id": str(invalid), "prompt": "hi", "params": {"max_tokens": -1}},
    )
    producer.send_task("inferq.generate", queue=q, args=[1], serializer="pickle")
    producer.send_task("inferq.no_such_task", queue=q, kwargs={"x": 1})
    producer.send_task("inferq.generate", queue=q, kwargs={"job_id": str(good), "prompt": "Hi"})
    views = _wait_for(repo, [unknown, oversized, good])
    assert views[unknown].status == "failed" and "unknown model 'no-such-model'" in (
        views[unknown].error
    )
    assert views[oversized].status == "failed" and "the limit is 2048" in views[oversized].error
    assert views[good].status == "done"
    deadline = time.monotonic() + 20
    while len(letters := _letters_since(repo, started)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    reasons = {d["reason"]: d for d in letters}
    assert len(reasons) == len(letters) == 3
    assert reasons["invalid job message"]["job_id"] == invalid
    assert "max_tokens" in reasons["invalid job message"]["error"]
    assert "pickle" in reasons["non-JSON message refused"]["error"]
    assert reasons["non-JSON message refused"]["payload"]["body_base64"]
    assert "unknown task name" in reasons
    assert repo.get(invalid) is None  # never stored as a job: nothing to run


def test_batch_crash_fails_only_the_crashing_job(service_settings, any_engine) -> None:
    wrapper = CrashingPagedEngine if isinstance(any_engine, StreamingEngine) else CrashingEngine
    crashing = wrapper(any_engine, poison="POISON")
    client = InferqClient(service_settings)
    with _worker(service_settings, crashing) as app:
        prompts = ["Say one.", "Say two.", "POISON pill", "Say four.", "Say five."]
        ids = client.submit_many({"prompt": p, "params": {"max_tokens": 6}} for p in prompts)
        views = client.wait_many(ids, timeout=120)
        assert app.inferq_runtime is not None
    statuses = [v.status for v in views]
    assert statuses == ["done", "done", "failed", "done", "done"]
    assert "simulated kernel failure" in views[2].error and views[2].result is None
    assert crashing.calls >= 2  # the batch was split to isolate the poisoned job


def test_redelivered_message_runs_once(service_settings, worker_app) -> None:
    producer, repo = _producer(service_settings), Repository(service_settings.database_url)
    job_id = uuid.uuid4()
    kwargs = {"job_id": str(job_id), "prompt": "Count to three:", "params": {"max_tokens": 8}}
    producer.send_task("inferq.generate", queue=service_settings.queue, kwargs=kwargs)
    _wait_for(repo, [job_id])
    producer.send_task("inferq.generate", queue=service_settings.queue, kwargs=kwargs)
    time.sleep(2.0)
    view = repo.get(job_id)
    assert view.status == "done" and view.attempts == 1
    with repo.engine.connect() as conn:
        count = conn.scalar(
            sa.text("SELECT count(*) FROM results WHERE job_id = :j"), {"j": job_id}
        )
    assert count == 1


def test_cancelled_before_start_never_runs(service_settings, engine) -> None:
    client = InferqClient(service_settings)
    job_id = client.submit("Tell me a story.", params={"max_tokens": 8})
    assert client.cancel(job_id) is True
    later = client.submit("Say hi.", params={"max_tokens": 4})
    with _worker(service_settings, engine):
        assert client.wait(later, timeout=120).status == "done"
    view = client.get(job_id)
    assert view.status == "cancelled" and view.result is None and view.attempts == 0


def test_prefix_cache_reuse_across_batches_lands_in_postgres(service_settings, worker_app):
    client = InferqClient(service_settings)
    system = {
        "role": "system",
        "content": "You are a meticulous assistant for a travel agency. "
        "Answer questions about cities, countries and landmarks in one short sentence.",
    }

    def wave(questions: list[str], tenant: str) -> list:
        ids = client.submit_many(
            {
                "messages": [system, {"role": "user", "content": q}],
                "tenant": tenant,
                "params": {"max_tokens": 6},
            }
            for q in questions
        )
        return client.wait_many(ids, timeout=120)

    first = wave(["Where is Rome?"], "acme")
    later = wave(["Where is Oslo?", "Where is Lima?", "Where is Cairo?"], "acme")
    stranger = wave(["Where is Rome?"], "globex")
    assert first[0].status == "done" and first[0].result.cached_tokens == 0
    assert all(v.status == "done" and v.result.cached_tokens >= 32 for v in later)
    assert stranger[0].result.cached_tokens == 0  # tenants never share prefix blocks
    with client.repo.engine.connect() as conn:
        stats = conn.execute(
            sa.text(
                "SELECT b.stats FROM batches b JOIN jobs j ON j.batch_id = b.id WHERE j.id = :j"
            ),
            {"j": later[0].id},
        ).scalar_one()
    assert stats["cached_tokens"] >= 32 and stats["cache_hit_rate"] > 0
    assert {"blocks_used", "blocks_free", "blocks_evicted"} <= stats.keys()


def test_storage_blip_requeues_the_job_instead_of_losing_it(service_settings, paged_engine):
    client = InferqClient(service_settings)
    flaky = FlakyRepository(service_settings.database_url)
    with _worker(service_settings, paged_engine, repo=flaky):
        job_id = client.submit("Say hi.", params={"max_tokens": 4})
        view = client.wait(job_id, timeout=120)
    assert flaky.failures == 1
    assert view.status == "done" and view.result.completion_tokens > 0


def test_cancel_while_running_stops_the_job_in_the_engine(service_settings, worker_app):
    client = InferqClient(service_settings)
    long_job = client.submit("Count slowly from one to one thousand:", params={"max_tokens": 400})
    deadline = time.monotonic() + 60
    while client.get(long_job).status != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.cancel(long_job) is True
    view = client.wait(long_job, timeout=10)
    assert view.status == "cancelled" and view.result is None
    time.sleep(1.0)  # the worker drops it at its next cancellation check
    assert not worker_app.inferq_runtime.engine.has_work  # no tokens spent on it any more
    after = client.submit("Say hi.", params={"max_tokens": 4})
    assert client.wait(after, timeout=60).status == "done"  # the worker keeps serving
    assert client.get(long_job).result is None
