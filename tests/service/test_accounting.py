"""What each job did, waited, computed and cost, as the worker writes it: the per-job facts
in `job_metrics`, compute attribution summing to the engine's busy time, costs at the price
versions in force, and the queue wait measured from the producer's clock."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from service_helpers import producer, running_worker, wait_for, wait_status

from api_client import InferqClient
from storage.prices import set_price, set_rate
from storage.repository import Repository
from worker.engine.null import NullEngine

pytestmark = pytest.mark.services
PRICE = {
    "prompt": Decimal("0.15"),
    "cached_prompt": Decimal("0.075"),
    "completion": Decimal("0.60"),
}
RATE = Decimal("3.60")  # per hour: a cent per 10 s
SYSTEM = {
    "role": "system",
    "content": "You are a meticulous assistant for a travel agency. "
    "Answer questions about cities, countries and landmarks in one short sentence.",
}


def _facts(repo: Repository, ids: list[uuid.UUID]) -> dict[uuid.UUID, sa.Row]:
    with repo.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM job_metrics WHERE job_id = ANY(:ids)"), {"ids": ids}
        )
        return {row.job_id: row for row in rows}


def _busy(repo: Repository, worker: str) -> tuple[float, float]:
    with repo.engine.connect() as conn:
        busy, idle = conn.execute(
            sa.text("SELECT sum(busy_s), sum(idle_s) FROM worker_usage WHERE worker = :w"),
            {"w": worker},
        ).one()
    return busy, idle


@pytest.mark.model
def test_jobs_carry_their_compute_and_costs(service_settings, paged_engine) -> None:
    settings = service_settings.model_copy(update={"worker_name": f"acct-{uuid.uuid4().hex[:8]}"})
    model, tenant = paged_engine.model_name, f"t-{uuid.uuid4().hex[:8]}"
    repo = Repository(settings.database_url)
    since = datetime.now(UTC) - timedelta(days=1)
    set_price(repo.engine, model, **PRICE, effective_from=since)
    set_rate(repo.engine, settings.worker_name, RATE, effective_from=since)
    client = InferqClient(settings).for_tenant(tenant)
    with running_worker(settings, {model: paged_engine}):
        questions = ["Where is Rome?", "Where is Oslo?", "Where is Lima?", "Where is Cairo?"]
        first = client.submit(
            messages=[SYSTEM, {"role": "user", "content": "Where is Bern?"}],
            params={"max_tokens": 8},
        )
        client.wait(first, timeout=120)
        later = client.submit_many(
            {"messages": [SYSTEM, {"role": "user", "content": q}], "params": {"max_tokens": 8}}
            for q in questions
        )
        ids = [first, *later]
        assert [v.status for v in client.wait_many(ids, timeout=120)] == ["done"] * len(ids)
    # stopped: the worker's last usage figures are written
    facts = _facts(repo, ids)
    busy, idle = _busy(repo, settings.worker_name)
    assert sum(f.compute_s for f in facts.values()) == pytest.approx(busy, abs=1e-3)
    assert idle > 0
    assert sum(f.cached_prompt_tokens for f in facts.values()) >= 32 * len(questions)
    for f in facts.values():
        assert (f.tenant, f.model, f.status, f.worker) == (
            tenant,
            model,
            "done",
            settings.worker_name,
        )
        assert f.computed_prompt_tokens == f.prompt_tokens - f.cached_prompt_tokens
        assert f.completion_tokens > 0 and f.compute_s > 0 and f.device == "cpu"
        assert (
            f.enqueued_at <= f.first_seen_at <= f.admitted_at <= f.first_token_at <= f.finished_at
        )
        assert f.queue_wait_s == pytest.approx((f.admitted_at - f.enqueued_at).total_seconds())
        assert f.ttft_s == pytest.approx((f.first_token_at - f.enqueued_at).total_seconds())
        uncached = f.prompt_tokens - f.cached_prompt_tokens
        list_cost = (
            uncached * PRICE["prompt"]
            + f.cached_prompt_tokens * PRICE["cached_prompt"]
            + f.completion_tokens * PRICE["completion"]
        ) / 1_000_000
        assert f.list_cost == list_cost.quantize(Decimal("1e-10"))
        savings = f.cached_prompt_tokens * (PRICE["prompt"] - PRICE["cached_prompt"]) / 1_000_000
        assert f.cache_savings == savings.quantize(Decimal("1e-10"))
        compute_cost = Decimal(f"{f.compute_s:.6f}") * RATE / 3600
        assert f.compute_cost == compute_cost.quantize(Decimal("1e-10"))
    with repo.engine.connect() as conn:
        day = conn.execute(
            sa.text("SELECT * FROM usage_daily WHERE tenant = :t"), {"t": tenant}
        ).one()
        hourly = conn.execute(
            sa.text("SELECT * FROM engine_hourly WHERE worker = :w"), {"w": settings.worker_name}
        ).all()
    assert (day.jobs, day.done, day.failed) == (len(ids), len(ids), 0)
    assert day.completion_tokens == sum(f.completion_tokens for f in facts.values())
    assert day.list_cost == sum(f.list_cost for f in facts.values())
    assert sum(h.busy_s for h in hourly) == pytest.approx(busy)
    assert all(0 < h.busy_share <= 1 for h in hourly if h.busy_s)
    assert max(h.mean_running_seqs for h in hourly if h.steps) > 1


@pytest.mark.model
def test_a_job_cancelled_while_running_is_billed_its_compute(service_settings, fp_worker):
    repo = fp_worker.repo
    set_rate(repo.engine, "cpu", RATE, effective_from=datetime.now(UTC) - timedelta(days=1))
    client = InferqClient(service_settings)
    job = client.submit("Count slowly from one to one thousand:", params={"max_tokens": 400})
    wait_status(client, job, "running")
    time.sleep(1.0)
    assert client.cancel(job)
    deadline = time.monotonic() + 10
    while not (_facts(repo, [job]).get(job) and _facts(repo, [job])[job].compute_s > 0):
        assert time.monotonic() < deadline, "the cancelled job's compute was not recorded"
        time.sleep(0.1)
    fact = _facts(repo, [job])[job]
    assert fact.status == "cancelled" and fact.completion_tokens == 0 and fact.list_cost is None
    assert fact.compute_cost == (Decimal(f"{fact.compute_s:.6f}") * RATE / 3600).quantize(
        Decimal("1e-10")
    )


def test_queue_wait_counts_from_the_producer_clock(service_settings) -> None:
    """A message without `submitted_at` has no known enqueue time: its queue wait is NULL,
    not the time since the worker saw it; one with it counts the time spent in Redis."""
    app, now = producer(service_settings), datetime.now(UTC)
    sent = {
        uuid.uuid4(): None,
        uuid.uuid4(): now - timedelta(seconds=30),
        uuid.uuid4(): now - timedelta(days=40),
    }
    for job_id, at in sent.items():
        kwargs = {"job_id": str(job_id), "prompt": "hello", "model": "null"}
        if at is not None:
            kwargs["submitted_at"] = at.isoformat()
        app.send_task("inferq.generate", queue=service_settings.queue, kwargs=kwargs)
    settings = service_settings.model_copy(update={"model": "null"})
    with running_worker(settings, {"null": NullEngine()}) as service:
        views = wait_for(service.repo, list(sent))
        facts = _facts(service.repo, list(sent))
    assert all(v.status == "done" for v in views.values())
    unknown, recent, ancient = (facts[j] for j in sent)
    assert unknown.enqueued_at is None and unknown.first_seen_at is not None
    assert unknown.queue_wait_s is None and unknown.ttft_s is None and unknown.total_s is None
    assert unknown.prefill_s is not None and unknown.admitted_at >= unknown.first_seen_at
    assert recent.queue_wait_s >= 30 and recent.enqueued_at == sent[list(sent)[1]]
    assert timedelta(days=6) < now - ancient.enqueued_at <= timedelta(days=7, minutes=1)


def test_every_ended_job_has_facts_and_null_engine_compute_sums_to_busy(service_settings):
    settings = service_settings.model_copy(
        update={"model": "null", "worker_name": f"null-{uuid.uuid4().hex[:8]}"}
    )
    client = InferqClient(settings)
    ok = client.submit_many({"prompt": f"job {i}", "params": {"max_tokens": 3}} for i in range(40))
    unknown = client.submit("hi", model="no-such-model")
    with running_worker(settings, {"null": NullEngine()}) as service:
        views = wait_for(service.repo, [*ok, unknown])
        late = client.build("late", ttl_s=1.0)
        expired = client.enqueue(
            late.model_copy(update={"submitted_at": datetime.now(UTC) - timedelta(seconds=5)})
        )
        wait_status(client, expired, "expired", timeout=30)
    facts = _facts(service.repo, [*ok, unknown, expired])
    assert views[unknown].status == "failed"
    assert facts[unknown].status == "failed" and facts[expired].status == "expired"
    assert all(facts[j].status == "done" and facts[j].completion_tokens == 3 for j in ok)
    busy, _ = _busy(service.repo, settings.worker_name)
    assert sum(facts[j].compute_s for j in ok) == pytest.approx(busy, abs=1e-3)
    with service.repo.engine.connect() as conn:
        reasons = dict(
            conn.execute(
                sa.text(
                    "SELECT kind || '/' || reason, count FROM failures_daily "
                    "WHERE kind <> 'dead_letter' AND reason LIKE :r"
                ),
                {"r": "unknown model 'no-such-model'%"},
            ).all()
        )
    assert reasons.get("failed/unknown model 'no-such-model'", 0) >= 1
