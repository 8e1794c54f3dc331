"""The whole path on real Redis + PostgreSQL + the real model, with the worker service in
this process: intake, engine loop and result sink."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from service_helpers import producer, records, running_worker, wait_for, wait_status

from api_client import InferqClient
from storage.repository import Repository
from worker.engine.api import EngineRequest
from worker.service.app import WorkerService

pytestmark = [pytest.mark.model, pytest.mark.services]


class CrashingEngine:
    """The real engine, except that a step raises while a poisoned sequence is live."""

    def __init__(self, engine, poison: str):
        self.inner, self.poison, self.crashes = engine, poison, 0
        self.poisoned: set[str] = set()
        self.codec = engine.new_codec()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def add(self, request: EngineRequest) -> None:
        self.inner.add(request)
        if self.poison in self.codec.decode(request.prompt_ids):
            self.poisoned.add(request.seq_id)

    def abort(self, seq_id: str) -> float:
        self.poisoned.discard(seq_id)
        return self.inner.abort(seq_id)

    def step(self):
        if self.poisoned:
            self.crashes += 1
            raise RuntimeError("simulated kernel failure")
        return self.inner.step()


class FlakyRepository(Repository):
    """The real repository, except that the first writes of results and the first claim fail
    (a database outage while sequences are running)."""

    def __init__(self, url: str, result_failures: int, claim_failures: int = 0):
        super().__init__(url)
        self.result_failures, self.claim_failures = result_failures, claim_failures
        self.failed_writes = 0

    def claim(self, *args, **kwargs):
        if self.claim_failures:
            self.claim_failures -= 1
            raise sa.exc.OperationalError("claim", {}, ConnectionError("database is away"))
        return super().claim(*args, **kwargs)

    def store_outcomes(self, *args, **kwargs):
        if self.failed_writes < self.result_failures:
            self.failed_writes += 1
            raise sa.exc.OperationalError("store", {}, ConnectionError("database is away"))
        return super().store_outcomes(*args, **kwargs)


def _results_per_job(repo: Repository, ids: list[uuid.UUID]) -> list[int]:
    with repo.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT count(*) FROM results WHERE job_id = ANY(:ids) GROUP BY job_id"),
            {"ids": ids},
        )
        return [n for (n,) in rows]


def test_client_to_postgres_full_path(service_settings, fp_worker) -> None:
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
    with records(service_settings).engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT j.status, r.completion_tokens, m.queue_wait_s, b.size, b.real_tokens "
                "FROM jobs j JOIN results r ON r.job_id = j.id "
                "JOIN job_metrics m ON m.job_id = j.id "
                "JOIN batches b ON b.id = j.batch_id WHERE j.id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
    assert len(rows) == len(ids)
    assert max(r.size for r in rows) > 1, "jobs were not admitted together"
    assert all(r.real_tokens > 0 for r in rows)


def test_raw_send_task_with_documented_kwargs(service_settings, fp_worker) -> None:
    app = producer(service_settings)
    full_id, minimal_id = uuid.uuid4(), uuid.uuid4()
    app.send_task(
        "inferq.generate",
        queue=service_settings.queue,
        kwargs={
            "job_id": str(full_id),
            "tenant": "acme",
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
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
    app.send_task(
        "inferq.generate",
        queue=service_settings.queue,
        kwargs={"job_id": str(minimal_id), "prompt": "The sky is"},
    )
    views = wait_for(fp_worker.repo, [full_id, minimal_id])
    assert views[full_id].status == "done" and "Paris" in views[full_id].result.text
    assert views[full_id].tenant == "acme" and views[full_id].idempotency_key == "order-42"
    assert views[minimal_id].status == "done" and views[minimal_id].tenant == "default"


def test_bad_input_fails_clearly_and_worker_keeps_serving(service_settings, fp_worker) -> None:
    app, repo = producer(service_settings), fp_worker.repo
    q, started = service_settings.queue, datetime.now(UTC)
    unknown, oversized, invalid, good = (uuid.uuid4() for _ in range(4))
    send = app.send_task
    send(
        "inferq.generate",
        queue=q,
        kwargs={"job_id": str(unknown), "prompt": "hi", "model": "no-such-model"},
    )
    send("inferq.generate", queue=q, kwargs={"job_id": str(oversized), "prompt": "word " * 3000})
    send(
        "inferq.generate",
        queue=q,
        kwargs={"job_id": str(invalid), "prompt": "hi", "params": {"max_tokens": -1}},
    )
    send("inferq.generate", queue=q, args=[1], serializer="pickle")
    send("inferq.no_such_task", queue=q, kwargs={"x": 1})
    send("inferq.generate", queue=q, kwargs={"job_id": str(good), "prompt": "Hi"})
    views = wait_for(repo, [unknown, oversized, good])
    assert views[unknown].status == "failed"
    assert "unknown model 'no-such-model'" in views[unknown].error
    assert views[oversized].status == "failed" and "the limit is 2048" in views[oversized].error
    assert views[good].status == "done"
    deadline = time.monotonic() + 20
    letters: list[dict] = []
    while len(letters) < 3 and time.monotonic() < deadline:
        letters = [d for d in repo.dead_letters() if d["received_at"] >= started]
        time.sleep(0.2)
    reasons = {d["reason"]: d for d in letters}
    assert len(reasons) == len(letters) == 3
    assert reasons["invalid job message"]["job_id"] == invalid
    assert "max_tokens" in reasons["invalid job message"]["error"]
    assert "python-serialize" in reasons["non-JSON message refused"]["error"]
    assert reasons["non-JSON message refused"]["payload"]["body_base64"]
    assert "unknown task name" in reasons
    assert repo.get(invalid) is None  # never stored as a job: nothing to run


def test_a_crashing_step_fails_only_the_crashing_job(service_settings, paged_engine) -> None:
    crashing = CrashingEngine(paged_engine, poison="POISON")
    client = InferqClient(service_settings)
    with running_worker(service_settings, {paged_engine.model_name: crashing}):
        prompts = ["Say one.", "Say two.", "POISON pill", "Say four.", "Say five."]
        ids = client.submit_many({"prompt": p, "params": {"max_tokens": 6}} for p in prompts)
        views = client.wait_many(ids, timeout=120)
    assert [v.status for v in views] == ["done", "done", "failed", "done", "done"]
    assert "simulated kernel failure" in views[2].error and views[2].result is None
    assert crashing.crashes >= 2  # the live jobs were rerun apart to find the culprit


def test_redelivered_message_runs_once(service_settings, fp_worker) -> None:
    app, repo = producer(service_settings), fp_worker.repo
    job_id = uuid.uuid4()
    kwargs = {"job_id": str(job_id), "prompt": "Count to three:", "params": {"max_tokens": 8}}
    app.send_task("inferq.generate", queue=service_settings.queue, kwargs=kwargs)
    wait_for(repo, [job_id])
    app.send_task("inferq.generate", queue=service_settings.queue, kwargs=kwargs)
    time.sleep(2.0)
    view = repo.get(job_id)
    assert view.status == "done" and view.attempts == 1
    assert _results_per_job(repo, [job_id]) == [1]


def test_cancelled_before_start_never_runs(service_settings, paged_engine) -> None:
    client = InferqClient(service_settings)
    job_id = client.submit("Tell me a story.", params={"max_tokens": 8})
    assert client.cancel(job_id) is True
    later = client.submit("Say hi.", params={"max_tokens": 4})
    with running_worker(service_settings, {paged_engine.model_name: paged_engine}):
        assert client.wait(later, timeout=120).status == "done"
        view = client.wait(job_id, timeout=10)
    assert view.status == "cancelled" and view.result is None and view.attempts <= 1
    assert view.metrics is None or view.metrics.compute_s == 0  # it never ran


def test_prefix_cache_reuse_across_batches_lands_in_postgres(service_settings, fp_worker):
    client = InferqClient(service_settings)
    system = {
        "role": "system",
        "content": "You are a meticulous assistant for a travel agency. "
        "Answer questions about cities, countries and landmarks in one short sentence.",
    }

    def wave(questions: list[str], tenant: str) -> list:
        as_tenant = client.for_tenant(tenant)
        ids = as_tenant.submit_many(
            {"messages": [system, {"role": "user", "content": q}], "params": {"max_tokens": 6}}
            for q in questions
        )
        return as_tenant.wait_many(ids, timeout=120)

    first = wave(["Where is Rome?"], "acme")
    later = wave(["Where is Oslo?", "Where is Lima?", "Where is Cairo?"], "acme")
    stranger = wave(["Where is Rome?"], "globex")
    assert first[0].status == "done" and first[0].result.cached_tokens == 0
    assert all(v.status == "done" and v.result.cached_tokens >= 32 for v in later)
    assert stranger[0].result.cached_tokens == 0  # tenants never share prefix blocks
    with records(service_settings).engine.connect() as conn:
        stats = conn.execute(
            sa.text(
                "SELECT b.stats FROM batches b JOIN jobs j ON j.batch_id = b.id WHERE j.id = :j"
            ),
            {"j": later[0].id},
        ).scalar_one()
    assert stats["cached_tokens"] >= 32 and stats["cache_hit_rate"] > 0
    assert {"blocks_used", "blocks_free", "blocks_evicted"} <= stats.keys()


def test_database_outage_during_steps_delays_results_and_aborts_nothing(
    service_settings, paged_engine
) -> None:
    """Writes fail while sequences run (and the first claim too): every job still finishes
    with the tokens an undisturbed engine gives, one result each, no delivery repeated."""
    prompts = [f"List {n} fruits:" for n in range(2, 8)]
    codec = paged_engine.new_codec()
    from worker.engine.api import SamplingParams, run_to_completion

    reference = run_to_completion(
        paged_engine,
        [
            EngineRequest(
                seq_id=f"ref-{i}",
                prompt_ids=codec.encode(p, None),
                params=SamplingParams(max_tokens=12),
            )
            for i, p in enumerate(prompts)
        ],
    )
    flaky = FlakyRepository(service_settings.database_url, result_failures=4, claim_failures=1)
    client = InferqClient(service_settings)
    with running_worker(service_settings, {paged_engine.model_name: paged_engine}, repo=flaky):
        ids = client.submit_many({"prompt": p, "params": {"max_tokens": 12}} for p in prompts)
        views = client.wait_many(ids, timeout=180)
    assert flaky.failed_writes == 4 and flaky.claim_failures == 0
    assert [v.status for v in views] == ["done"] * len(prompts)
    assert [v.result.text for v in views] == [r.text for r in reference]
    assert all(v.attempts == 1 for v in views)  # nothing went back to the queue
    assert _results_per_job(records(service_settings), ids) == [1] * len(ids)


def test_cancel_while_running_stops_the_job_in_the_engine(service_settings, fp_worker):
    client = InferqClient(service_settings)
    long_job = client.submit("Count slowly from one to one thousand:", params={"max_tokens": 400})
    wait_status(client, long_job, "running")
    assert client.cancel(long_job) is True
    view = client.wait(long_job, timeout=10)
    assert view.status == "cancelled" and view.result is None
    time.sleep(0.2)  # the cancel reached the worker by notification: dropped at once
    assert not any(e.has_work for e in fp_worker.engines.values())  # no tokens spent any more
    after = client.submit("Say hi.", params={"max_tokens": 4})
    assert client.wait(after, timeout=60).status == "done"  # the worker keeps serving
    assert client.get(long_job).result is None


def test_stop_puts_unfinished_jobs_back_on_the_queue_at_once(service_settings, paged_engine):
    """A clean stop with no time to drain: held messages return to the queue immediately
    (not after the 30-minute visibility timeout) and the next worker finishes them, once."""
    client = InferqClient(service_settings)
    ids = client.submit_many(
        {"prompt": f"Count from {n} to one hundred:", "params": {"max_tokens": 200}}
        for n in range(4)
    )
    engines = {paged_engine.model_name: paged_engine}
    first = WorkerService(service_settings, engines=engines).start()
    deadline = time.monotonic() + 60
    repo = records(service_settings)
    while "running" not in repo.statuses(ids).values() and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop(drain_s=0)
    assert "done" not in repo.statuses(ids).values(), "the stop came too late"
    assert not paged_engine.has_work
    with running_worker(service_settings, engines):
        views = client.wait_many(ids, timeout=120)
    assert [v.status for v in views] == ["done"] * len(ids)
    assert all(v.attempts == 1 for v in views), "a hand-back is not a failed attempt"
    assert _results_per_job(records(service_settings), ids) == [1] * len(ids)


def test_metrics_and_health_endpoints(service_settings, paged_engine) -> None:
    settings = service_settings.model_copy(update={"metrics_port": 0, "heartbeat_s": 0.2})
    client = InferqClient(settings)
    with running_worker(settings, {paged_engine.model_name: paged_engine}) as worker:
        ids = client.submit_many(
            {"prompt": f"Say {n}.", "params": {"max_tokens": 3}} for n in range(2)
        )
        client.wait_many(ids, timeout=120)
        base = f"http://127.0.0.1:{worker.http.port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
            done = f'inferq_jobs_total{{model="{paged_engine.model_name}",status="done"}} 2.0'
            if done in text and "inferq_queue_depth 0.0" in text:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(text)
        assert "inferq_kv_blocks" in text and "inferq_job_seconds_bucket" in text
        assert "inferq_queue_depth 0.0" in text
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        deadline = time.monotonic() + 10  # ready once a sweep has answered lately
        while time.monotonic() < deadline and not worker.ready():
            time.sleep(0.1)
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
    with pytest.raises(urllib.error.URLError):  # stopped: the endpoint is gone
        urllib.request.urlopen(f"{base}/healthz", timeout=2)


def test_deadlines_expire_jobs_before_and_while_they_run(service_settings, fp_worker) -> None:
    client = InferqClient(service_settings)
    late = client.build("Say hi.", params={"max_tokens": 4}).model_copy(
        update={"submitted_at": datetime.now(UTC) - timedelta(seconds=60), "ttl_s": 30.0}
    )
    stale = client.enqueue(late)  # its deadline passed while it sat in the queue
    slow = client.submit(
        "Count slowly from one to one thousand:", params={"max_tokens": 400}, ttl_s=2.0
    )
    quick = client.submit("Say hi.", params={"max_tokens": 4}, ttl_s=120.0)
    views = {v.id: v for v in client.wait_many([stale, slow, quick], timeout=120)}
    assert views[stale].status == "expired" and views[stale].attempts == 0
    assert views[stale].result is None and "deadline" in views[stale].error
    assert views[slow].status == "expired" and views[slow].result is None
    assert views[slow].attempts == 1  # it started, then its deadline passed mid-run
    assert views[quick].status == "done" and views[quick].expires_at is not None
    time.sleep(0.5)
    assert not any(e.has_work for e in fp_worker.engines.values())
