"""The webhook outbox in SQL, on PostgreSQL and SQLite, without a worker: a delivery is written
in the transaction that ends a job (and only for jobs with a callback URL), claims lease it on
the database's clock, a lapsed lease goes to another sender, and a stale claim's outcome is
kept as an attempt row without moving the delivery."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from storage.models import Base
from storage.models import webhook_deliveries_table as D
from storage.records import EndedJob, NewJob, utcnow
from storage.repository import Repository
from storage.webhooks import Deliveries, Outcome

URL = "https://hooks.example.com/inferq"


def _jobs(repo: Repository, n: int, url: str | None = URL) -> list[uuid.UUID]:
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    jobs = [NewJob(uuid.uuid4(), tenant, "m", prompt="hi", callback_url=url) for _ in range(n)]
    repo.claim(jobs, "w")
    return [j.id for j in jobs]


def _done(repo: Repository, job_id: uuid.UUID, text: str = "Paris.") -> None:
    ended = EndedJob(
        job_id,
        "m",
        "w",
        "cpu",
        utcnow(),
        text=text,
        finish_reason="stop",
        prompt_tokens=4,
        completion_tokens=2,
    )
    repo.store_outcomes([ended])


def _rows(repo: Repository, table: str, job_ids: list[uuid.UUID]) -> list[sa.Row]:
    t = Base.metadata.tables[table]
    with repo.engine.connect() as conn:
        return conn.execute(sa.select(t).where(t.c.job_id.in_(job_ids))).all()


def _delivery_of(repo: Repository, deliveries: Deliveries, job_id: uuid.UUID):
    """Claim until this job's delivery comes (other tests' rows may be due too)."""
    for _ in range(100):
        for c in deliveries.claim("w1", 50, lease_s=60):
            if c.job_id == job_id:
                return c
    raise AssertionError("the delivery was never claimed")


def test_a_job_end_writes_its_delivery_in_the_same_transaction(db_url: str) -> None:
    repo = Repository(db_url)
    done, failed, cancelled, running = _jobs(repo, 4)
    (no_url,) = _jobs(repo, 1, url=None)
    _done(repo, done)
    repo.fail_jobs({failed: "boom"})
    assert repo.cancel(cancelled)
    _done(repo, no_url)
    rows = {
        r.job_id: r
        for r in _rows(repo, "webhook_deliveries", [done, failed, cancelled, running, no_url])
    }
    assert set(rows) == {done, failed, cancelled}
    assert {j: r.event for j, r in rows.items()} == {
        done: "done",
        failed: "failed",
        cancelled: "cancelled",
    }
    assert all(r.state == "pending" and r.attempts == 0 for r in rows.values())
    body = json.loads(rows[done].body)
    assert body["type"] == "job.done" and body["timestamp"] == body["data"]["finished_at"]
    assert body["data"] | {"finished_at": None} == {
        "job_id": str(done),
        "tenant": rows[done].tenant,
        "model": "m",
        "status": "done",
        "idempotency_key": None,
        "error": None,
        "finished_at": None,
        "text": "Paris.",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "cached_tokens": 0},
    }
    failure = json.loads(rows[failed].body)["data"]
    assert (failure["error"], failure["text"], failure["usage"]) == ("boom", None, None)
    # ending again (a repeated write, a result racing in after the failure): one per status
    _done(repo, done)
    _done(repo, failed, "late")
    events = sorted(r.event for r in _rows(repo, "webhook_deliveries", [done, failed]))
    assert events == ["done", "done", "failed"]


def test_claims_lease_skip_each_other_and_a_stale_claim_moves_nothing(db_url: str) -> None:
    repo = Repository(db_url)
    deliveries = Deliveries(repo)
    (job_id,) = _jobs(repo, 1)
    _done(repo, job_id)
    first = _delivery_of(repo, deliveries, job_id)
    assert (first.attempt, first.url) == (1, URL)
    assert all(c.id != first.id for c in deliveries.claim("w2", 50, lease_s=60))  # leased
    with repo.writer.begin() as conn:  # the lease lapses (as if w1 died mid-attempt)
        conn.execute(
            sa.update(D).where(D.c.id == first.id).values(next_attempt_at=first.claimed_at)
        )
    second = next(c for c in deliveries.claim("w2", 50, lease_s=60) if c.id == first.id)
    assert second.attempt == 2 and second.claimed_at >= first.claimed_at
    # w1 comes back with a 200: the attempt is recorded, the delivery stays w2's
    ok = Outcome("delivered", 200, 12)
    assert deliveries.record(first, ok, "w1", retry_in_s=1, retry_for_s=60) is None
    assert (
        deliveries.record(
            second, Outcome("failed", 503, 8, "HTTP 503"), "w2", retry_in_s=30, retry_for_s=60
        )
        == "pending"
    )
    # the same outcome written again (its commit's answer was lost): nothing more
    assert deliveries.record(second, ok, "w2", retry_in_s=1, retry_for_s=60) is None
    (row,) = _rows(repo, "webhook_deliveries", [job_id])
    assert (row.state, row.attempts, row.leased_by) == ("pending", 2, "w2")
    tried = sorted(
        (a.attempt, a.status, a.worker) for a in _rows(repo, "webhook_attempts", [job_id])
    )
    assert tried == [(1, "delivered", "w1"), (2, "failed", "w2")]


def test_concurrent_claims_never_hand_out_one_delivery_twice(db_url: str) -> None:
    repo = Repository(db_url)
    ids = _jobs(repo, 30)
    for job_id in ids:
        _done(repo, job_id)
    got: list[uuid.UUID] = []
    lock = threading.Lock()

    def claim(worker: str) -> None:
        deliveries = Deliveries(repo)
        for _ in range(20):
            claimed = deliveries.claim(worker, 3, lease_s=60)
            with lock:
                got.extend(c.id for c in claimed if c.job_id in ids)
            time.sleep(0.01)

    threads = [threading.Thread(target=claim, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 30


@pytest.mark.parametrize("outcome", ["refused", "time"])
def test_a_delivery_is_given_up_with_its_reason(db_url: str, outcome: str) -> None:
    repo = Repository(db_url)
    deliveries = Deliveries(repo)
    (job_id,) = _jobs(repo, 1)
    _done(repo, job_id)
    claimed = _delivery_of(repo, deliveries, job_id)
    if outcome == "refused":
        result = Outcome("refused", error="10.0.0.1 is a private address")
        state = deliveries.record(claimed, result, "w1", retry_in_s=1, retry_for_s=60)
        reason = "refused: 10.0.0.1 is a private address"
    else:  # the next retry would come after the bound
        result = Outcome("failed", error="ConnectTimeout")
        state = deliveries.record(claimed, result, "w1", retry_in_s=61, retry_for_s=60)
        reason = "gave up after 1 attempts in "
    (row,) = _rows(repo, "webhook_deliveries", [job_id])
    assert state == row.state == "failed" and row.error.startswith(reason)
    assert row.ended_at is not None
