"""Heartbeats and the sweeper's requeue queries, on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from storage.records import NewJob
from storage.repository import Repository
from storage.sweeps import Sweeps

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _job(queued_at: datetime) -> NewJob:
    return NewJob(
        id=uuid.uuid4(),
        tenant=f"t-{uuid.uuid4().hex[:8]}",
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        params={"max_tokens": 3},
        priority=4,
        queued_at=queued_at,
    )


def test_requeue_finds_orphans_of_silent_workers_and_stranded_jobs(db_url: str) -> None:
    repo = Repository(db_url)
    sweeps = Sweeps(repo)
    suffix = uuid.uuid4().hex[:8]
    alive, dead, stopped = f"alive-{suffix}", f"dead-{suffix}", f"stopped-{suffix}"
    sweeps.heartbeat(alive, ["m"], T0, now=T0 + timedelta(seconds=100))
    sweeps.heartbeat(dead, ["m"], T0, now=T0 + timedelta(seconds=10))
    sweeps.heartbeat(stopped, ["m"], T0, stopped=True, now=T0 + timedelta(seconds=100))
    on_alive, on_dead, on_stopped, on_unknown = (_job(T0) for _ in range(4))
    for job, worker in (
        (on_alive, alive),
        (on_dead, dead),
        (on_stopped, stopped),
        (on_unknown, f"never-seen-{suffix}"),
    ):
        repo.claim([job], worker, now=T0 + timedelta(seconds=5))
    fresh, old = _job(T0 + timedelta(seconds=90)), _job(T0)
    repo.submit(fresh)
    repo.submit(old)
    now = T0 + timedelta(seconds=101)
    got = {j.id: j for j in sweeps.requeue(dead_after_s=30, stranded_after_s=60, now=now)}
    mine = {on_alive.id, on_dead.id, on_stopped.id, on_unknown.id, fresh.id, old.id}
    assert got.keys() & mine == {on_dead.id, on_stopped.id, on_unknown.id, old.id}
    job = got[old.id]
    assert (job.tenant, job.model, job.priority, job.params) == (
        old.tenant,
        "m",
        4,
        {"max_tokens": 3},
    )
    assert job.messages == [{"role": "user", "content": "hi"}] and job.queued_at == T0
    statuses = repo.statuses(mine)
    assert statuses[on_dead.id] == statuses[on_unknown.id] == "queued"
    assert statuses[on_alive.id] == "running"
    # sent again within the bound: not again until it passes (the live worker keeps beating)
    sweeps.heartbeat(alive, ["m"], T0, now=now + timedelta(seconds=29))
    again = sweeps.requeue(30, 60, now=now + timedelta(seconds=30))
    assert not {j.id for j in again} & mine
    later = sweeps.requeue(30, 60, now=now + timedelta(seconds=61))
    assert {on_dead.id, old.id} <= {j.id for j in later}


def test_requeue_expires_jobs_past_their_deadline_instead(db_url: str) -> None:
    repo = Repository(db_url)
    sweeps = Sweeps(repo)
    overdue, pending = _job(T0), _job(T0)
    overdue.expires_at = T0 + timedelta(seconds=30)
    pending.expires_at = T0 + timedelta(days=1)
    repo.submit(overdue)
    repo.submit(pending)
    got = {j.id: j for j in sweeps.requeue(30, 60, now=T0 + timedelta(seconds=100))}
    assert overdue.id not in got and got[pending.id].expires_at == pending.expires_at
    view = repo.get(overdue.id)
    assert view is not None and view.status == "expired" and "deadline" in (view.error or "")
