"""Storage layer against real PostgreSQL and SQLite: migrations and the repository API."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from api_client.schema import ChatMessage, JobMessage, SamplingParams
from storage import migrate
from storage.db import make_engine
from storage.models import Base
from storage.repository import (
    BatchRecord,
    EndedJob,
    JobState,
    MetricsRow,
    NewJob,
    Repository,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _job(tenant: str, key: str | None = None, **kw: Any) -> NewJob:
    kw.setdefault("queued_at", T0)
    return NewJob(id=uuid.uuid4(), tenant=tenant, model="m", prompt="hi", idempotency_key=key, **kw)


def _ended(
    job_id: uuid.UUID,
    finished_at: datetime,
    batch_id: uuid.UUID | None = None,
    queue_wait_s: float | None = None,
    ttft_s: float | None = None,
    total_s: float | None = None,
    tokens: int = 5,
    text: str = "out",
) -> EndedJob:
    """A finished job whose timestamps give these durations (enqueued `total_s` before it
    finished)."""
    enqueued = finished_at - timedelta(seconds=total_s) if total_s is not None else None
    after = lambda s: enqueued + timedelta(seconds=s) if enqueued and s is not None else None  # noqa: E731
    return EndedJob(
        job_id,
        "m",
        "w",
        "cpu",
        finished_at,
        compute_s=0.25,
        text=text,
        finish_reason="length",
        batch_id=batch_id,
        enqueued_at=enqueued,
        admitted_at=after(queue_wait_s),
        first_token_at=after(ttft_s),
        prompt_tokens=3,
        completion_tokens=tokens,
    )


def _batch(at: datetime = T0, size: int = 1) -> BatchRecord:
    return BatchRecord(uuid.uuid4(), "w", "m", size, 8, at, at + timedelta(seconds=1), 1.0)


def _finish(
    repo: Repository,
    ids: list[uuid.UUID],
    batch: BatchRecord | None = None,
    text: str = "out",
    tokens: int = 5,
    metrics: dict | None = None,
) -> set[uuid.UUID]:
    """Store results for `ids` as one batch (a fresh one unless given)."""
    batch = batch or _batch(size=len(ids))
    assert batch.finished_at is not None
    at = batch.finished_at
    finished = [_ended(i, at, batch.id, tokens=tokens, text=text, **(metrics or {})) for i in ids]
    return repo.store_outcomes(finished, [batch])


def _count(repo: Repository, table: str, ids: list[uuid.UUID]) -> int:
    t = Base.metadata.tables[table]
    with repo.engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).where(t.c.job_id.in_(ids)))


# -- migrations ------------------------------------------------------------------------


def test_upgrade_builds_schema_and_downgrade_round_trips(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == "0011"
    engine = make_engine(empty_db_url)
    insp = sa.inspect(engine)
    assert {"jobs", "batches", "results", "job_metrics", "workers"} <= set(insp.get_table_names())
    cols = {c["name"]: c for c in insp.get_columns("jobs")}
    assert set(cols) == {c.name for c in Base.metadata.tables["jobs"].columns}
    assert not cols["tenant"]["nullable"] and cols["idempotency_key"]["nullable"]
    uniques = {u["name"]: u["column_names"] for u in insp.get_unique_constraints("jobs")}
    assert uniques["uq_jobs_tenant_idempotency_key"] == ["tenant", "idempotency_key"]
    assert {"ix_jobs_status", "ix_jobs_queued_at"} <= {i["name"] for i in insp.get_indexes("jobs")}
    assert "ck_jobs_status" in {c["name"] for c in insp.get_check_constraints("jobs")}
    (fk,) = insp.get_foreign_keys("results")
    assert fk["referred_table"] == "jobs" and fk["options"].get("ondelete") == "CASCADE"
    with engine.connect() as conn:  # the handwritten revision matches the models
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []

    migrate.downgrade(empty_db_url, "0002")
    assert "expires_at" not in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    migrate.downgrade(empty_db_url, "0001")
    assert "requeued_at" not in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    assert "workers" not in sa.inspect(engine).get_table_names()
    migrate.downgrade(empty_db_url, "base")
    assert migrate.current(empty_db_url) is None
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(empty_db_url)
    assert "jobs" in sa.inspect(engine).get_table_names()


def test_status_check_and_foreign_keys_enforced(db_url: str) -> None:
    repo = Repository(db_url)
    with pytest.raises(sa.exc.IntegrityError), repo.engine.begin() as conn:
        conn.execute(Base.metadata.tables["results"].insert(), _ended(uuid.uuid4(), T0).result())
    job = _job(_tenant())
    repo.submit(job)
    with pytest.raises(sa.exc.IntegrityError), repo.engine.begin() as conn:
        jobs = Base.metadata.tables["jobs"]
        conn.execute(jobs.update().where(jobs.c.id == job.id).values(status="bogus"))


# -- submission ------------------------------------------------------------------------


def test_submit_is_idempotent_per_tenant_and_key(db_url: str) -> None:
    repo = Repository(db_url)
    tenant = _tenant()
    first = _job(tenant, "k1")
    assert repo.submit(first) == (first.id, True)
    assert repo.submit(_job(tenant, "k1")) == (first.id, False)
    assert repo.submit(first) == (first.id, False)
    other = _job(_tenant(), "k1")
    assert repo.submit(other) == (other.id, True)
    no_key = [_job(tenant), _job(tenant)]
    assert [repo.submit(j)[1] for j in no_key] == [True, True]
    assert repo.statuses([first.id, other.id]) == {first.id: "queued", other.id: "queued"}


def test_job_row_from_message(db_url: str) -> None:
    msg = JobMessage(
        tenant="acme",
        messages=[ChatMessage(role="user", content="hello")],
        params=SamplingParams(max_tokens=7, stop=["\n"]),
        priority=3,
        idempotency_key="abc",
        submitted_at=datetime(2026, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))),
    )
    job = msg.to_job("default-model")
    assert job.id == msg.job_id and job.model == "default-model" and job.prompt is None
    assert job.messages == [{"role": "user", "content": "hello"}]
    assert job.params["max_tokens"] == 7 and job.params["stop"] == ["\n"]
    assert job.queued_at == datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    assert msg.model_copy(update={"model": "x"}).to_job("d").model == "x"
    repo = Repository(db_url)
    repo.submit(job)
    view = repo.get(job.id)
    assert view is not None and view.queued_at == job.queued_at
    assert view.queued_at.tzinfo == UTC and view.priority == 3


def test_claim_maps_to_canonical_ids(db_url: str) -> None:
    repo = Repository(db_url)
    tenant = _tenant()
    existing = _job(tenant, "dup")
    repo.submit(existing)
    same_key = _job(tenant, "dup")
    fresh = _job(tenant, "new")
    twin_a, twin_b = _job(tenant, "twin"), _job(tenant, "twin")
    states = repo.claim([existing, same_key, fresh, twin_a, twin_b, fresh], "w")
    want = [(existing, existing), (same_key, existing), (fresh, fresh), (twin_a, twin_a)]
    assert {k: s.id for k, s in states.items()} == {
        k.id: v.id for k, v in [*want, (twin_b, twin_a)]
    }
    assert repo.get(same_key.id) is None and repo.get(twin_b.id) is None
    assert states[fresh.id] == JobState(fresh.id, "running", 1)
    assert repo.claim([], "w") == {}


def test_claim_bulk_in_few_statements(db_url: str) -> None:
    repo = Repository(db_url)
    tenant = _tenant()
    jobs = [_job(tenant, f"k{i}") for i in range(2000)]
    statements: list[str] = []
    _count_statement = lambda *args: statements.append(args[2])  # noqa: E731
    sa.event.listen(repo.engine, "before_cursor_execute", _count_statement)
    try:
        states = repo.claim(jobs, "w")
    finally:
        sa.event.remove(repo.engine, "before_cursor_execute", _count_statement)
    assert {k: s.id for k, s in states.items()} == {j.id: j.id for j in jobs}
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    # batched, not one per row (one of them: the lookup of ended jobs that owe a webhook)
    assert 1 <= len(inserts) <= 3 and len(statements) <= 9
    ids = [j.id for j in jobs]
    assert set(repo.statuses(ids).values()) == {"running"}
    assert repo.summary(ids)["total"] == 2000


def test_claim_counts_attempts_skips_finished_and_refuses(db_url: str) -> None:
    repo = Repository(db_url)
    tenant = _tenant()
    a, b, c, d, e = (_job(tenant) for _ in range(5))
    repo.claim([], "w0")
    repo.submit(d)
    assert repo.cancel(d.id)
    t1 = T0 + timedelta(seconds=1)
    states = repo.claim([a, b, c, d, e], "w1", {e.id: "too long"}, now=t1)
    assert all(states[j.id] == JobState(j.id, "running", 1) for j in (a, b, c))
    assert states[d.id] == JobState(d.id, "cancelled", 0)
    assert states[e.id] == JobState(e.id, "failed", 0)
    assert repo.get(e.id).error == "too long"  # type: ignore[union-attr]
    _finish(repo, [a.id])
    states = repo.claim([a, b, c], "w2", now=T0 + timedelta(2))
    assert states[a.id] == JobState(a.id, "done", 1)
    assert (states[b.id], states[c.id]) == (
        JobState(b.id, "running", 2),
        JobState(c.id, "running", 2),
    )
    view = repo.get(b.id)
    assert view is not None and view.worker == "w2" and view.started_at == T0 + timedelta(2)


def test_store_outcomes_writes_each_result_once(db_url: str) -> None:
    repo = Repository(db_url)
    jobs = [_job(_tenant()) for _ in range(3)]
    ids = [j.id for j in jobs]
    repo.claim(jobs, "w", now=T0)
    batch = _batch(T0, size=3)
    batch.stats = {"cached_tokens": 16, "steps": [1, 2]}
    times = {"queue_wait_s": 0.1, "ttft_s": 0.2, "total_s": 1.0}
    assert _finish(repo, ids[:2], batch, metrics=times) == set(ids[:2])
    batch.real_tokens, batch.duration_s = 30, 2.5  # the row is rewritten whole
    assert _finish(repo, ids, batch, "second", metrics=times) == {ids[2]}
    assert _finish(repo, ids, batch, "second", metrics=times) == set()
    assert _count(repo, "results", ids) == 3 and _count(repo, "job_metrics", ids) == 3
    views = repo.get_many(ids)
    assert [views[i].result.text for i in ids] == ["out", "out", "second"]  # type: ignore[union-attr]
    assert all(v.status == "done" and v.finished_at == batch.finished_at for v in views.values())
    assert all(v.batch_id == batch.id for v in views.values())
    expected = MetricsRow(
        ids[0], **times, prefill_s=0.1, decode_s=0.8, decode_tokens_per_s=5.0, compute_s=0.25
    )
    assert dataclasses.asdict(views[ids[0]].metrics) == pytest.approx(dataclasses.asdict(expected))
    batches = Base.metadata.tables["batches"]
    with repo.engine.connect() as conn:
        row = conn.execute(sa.select(batches).where(batches.c.id == batch.id)).one()
    assert (row.size, row.real_tokens, row.duration_s) == (3, 30, 2.5)
    assert row.stats == {"cached_tokens": 16, "steps": [1, 2]} and row.started_at == T0


def test_store_outcomes_records_failures_in_the_same_transaction(db_url: str) -> None:
    repo = Repository(db_url)
    ok, bad = _job(_tenant()), _job(_tenant())
    repo.claim([ok, bad], "w")
    batch = _batch()
    finished = _ended(ok.id, T0, batch.id)
    assert repo.store_outcomes([finished], [batch], {bad.id: "engine error"}) == {ok.id}
    views = repo.get_many([ok.id, bad.id])
    assert views[ok.id].status == "done"
    assert (views[bad.id].status, views[bad.id].error) == ("failed", "engine error")


def test_fail_jobs_final_and_retry(db_url: str) -> None:
    repo = Repository(db_url)
    tenant = _tenant()
    retry, final, done, cancelled = (_job(tenant) for _ in range(4))
    repo.claim([retry, final, done, cancelled], "w")
    repo.cancel(cancelled.id)
    _finish(repo, [done.id])
    errors = {j.id: f"boom {n}" for n, j in enumerate([retry, final, done, cancelled])}
    repo.fail_jobs(errors, final=False)
    views = repo.get_many(errors)
    assert (views[retry.id].status, views[retry.id].error) == ("queued", "boom 0")
    assert views[retry.id].finished_at is None
    repo.fail_jobs({final.id: "fatal", done.id: "x", cancelled.id: "x"})
    views = repo.get_many(errors)
    assert (views[final.id].status, views[final.id].error) == ("failed", "fatal")
    assert views[final.id].finished_at is not None
    assert (views[done.id].status, views[done.id].error) == ("done", None)
    assert (views[cancelled.id].status, views[cancelled.id].error) == ("cancelled", None)
    repo.fail_jobs({})


def test_cancel_queued_or_running_only(db_url: str) -> None:
    repo = Repository(db_url)
    queued, running, done = _job(_tenant()), _job(_tenant()), _job(_tenant())
    repo.submit(queued)
    repo.claim([running, done], "w")
    _finish(repo, [done.id])
    assert repo.cancel(queued.id) is True
    assert repo.cancel(queued.id) is False
    assert repo.cancel(running.id) is True
    assert repo.cancel(done.id) is False
    assert repo.cancel(uuid.uuid4()) is False
    # a result racing in after the cancel is kept, but the job stays cancelled
    assert _finish(repo, [running.id]) == {running.id}
    assert repo.get(running.id).status == "cancelled"
    assert repo.get(done.id).status == "done"
    view = repo.get(queued.id)
    assert view is not None and view.status == "cancelled" and view.finished_at is not None


# -- reads -----------------------------------------------------------------------------


def test_get_many_and_to_dict_round_trip(db_url: str) -> None:
    repo = Repository(db_url)
    local = datetime(2026, 3, 4, 15, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=-5)))
    job = _job(_tenant(), "key", queued_at=local, priority=4)
    bare = _job(_tenant())
    repo.submit(bare)
    repo.claim([job], "w", now=local + timedelta(seconds=1))
    batch = _batch(local + timedelta(seconds=1))
    _finish(repo, [job.id], batch, "ok", 4)
    views = repo.get_many([job.id, bare.id, uuid.uuid4()])
    assert set(views) == {job.id, bare.id}
    view = views[job.id]
    assert view.queued_at == local and view.queued_at.tzinfo == UTC
    assert views[bare.id].result is None and views[bare.id].metrics is None
    data = view.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["id"] == str(job.id) and data["batch_id"] == str(batch.id)
    assert data["queued_at"] == "2026-03-04T20:00:00.123456+00:00"
    assert data["finished_at"] == "2026-03-04T20:00:02.123456+00:00"
    result = {"text": "ok", "finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 4}
    assert data["result"] == {**result, "cached_tokens": 0}
    assert data["metrics"] == {**dict.fromkeys(data["metrics"]), "compute_s": 0.25}
    assert data["idempotency_key"] == "key"
    assert repo.get(uuid.uuid4()) is None and repo.get_many([]) == {}


def test_summary_figures(db_url: str) -> None:
    repo = Repository(db_url)
    tenant = _tenant()
    jobs = [_job(tenant, queued_at=T0 + timedelta(seconds=i)) for i in range(5)]
    ids = [j.id for j in jobs]
    repo.claim(jobs[:4], "w")
    repo.submit(jobs[4])
    end = T0 + timedelta(seconds=10)
    b1 = BatchRecord(uuid.uuid4(), "w", "m", 3, 1, T0, end)
    finished = [
        _ended(i, end, b1.id, queue_wait_s=float(n), ttft_s=0.5, total_s=5.0, tokens=10)
        for n, i in enumerate(ids[:3])
    ]
    repo.store_outcomes(finished, [b1], {ids[3]: "bad"})
    repo.cancel(ids[4])
    s = repo.summary(ids)
    assert s["total"] == 5
    assert s["counts"] == {
        "queued": 0,
        "running": 0,
        "done": 3,
        "failed": 1,
        "cancelled": 1,
        "expired": 0,
    }
    assert s["completion_tokens"] == 30
    assert s["mean_queue_wait_s"] == pytest.approx(1.0)
    assert s["mean_ttft_s"] == pytest.approx(0.5)
    assert s["first_queued_at"] == T0
    assert s["last_finished_at"] >= end and s["last_finished_at"].tzinfo == UTC
    assert s["batches"] == 1 and s["mean_batch_size"] == pytest.approx(3.0)
    empty = repo.summary([])
    assert empty["total"] == 0 and empty["mean_ttft_s"] is None and empty["elapsed_s"] is None
    assert repo.summary()["total"] >= 5


def test_concurrent_submits_create_one_job(db_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    repo = Repository(db_url)
    tenant = _tenant()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: repo.submit(_job(tenant, "race")), range(16)))
    assert len({job_id for job_id, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1


def test_dead_letters_keep_the_payload(db_url: str) -> None:
    repo = Repository(db_url)
    job_id = uuid.uuid4()
    payload = {"body": "\x80not json", "content_type": "application/x-python-serialize"}
    repo.record_dead_letter(
        "undecodable message (JSON only)", payload, "ContentDisallowed", job_id=None
    )
    repo.record_dead_letter("invalid job message", {"job_id": str(job_id)}, "bad", job_id=job_id)
    newest, older = repo.dead_letters(limit=2)
    assert newest["job_id"] == job_id and newest["reason"] == "invalid job message"
    assert older["payload"] == payload and older["error"] == "ContentDisallowed"
    assert older["received_at"] is not None
