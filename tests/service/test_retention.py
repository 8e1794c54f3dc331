"""Retention deletes old ended jobs with their results and facts, in batches, and keeps
active jobs, recent jobs and the hourly worker usage."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from storage import migrate
from storage.db import build_engine
from storage.models import Base
from storage.records import BatchRecord, EndedJob, NewJob, utcnow
from storage.repository import Repository
from storage.retention import purge

pytestmark = pytest.mark.services


def _count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(Base.metadata.tables[table]))


def test_purge_deletes_old_ended_jobs_in_batches(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    engine = build_engine(empty_db_url)
    repo = Repository(engine)
    now = utcnow()
    old, recent = now - timedelta(days=100), now - timedelta(days=1)
    jobs = {
        at: [NewJob(uuid.uuid4(), "t", "m", "hi", queued_at=at) for _ in range(7)]
        for at in (old, recent)
    }
    stuck = NewJob(uuid.uuid4(), "t", "m", "hi", queued_at=old)  # old but still queued
    repo.submit(stuck)
    for at, group in jobs.items():
        repo.claim(group, "w", now=at)
        batch = BatchRecord(uuid.uuid4(), "w", "m", len(group), 1, at, at, 0.0)
        finished = [
            EndedJob(
                j.id,
                "m",
                "w",
                "cpu",
                at,
                0.5,
                "out",
                "length",
                batch.id,
                prompt_tokens=3,
                completion_tokens=2,
            )
            for j in group
        ]
        repo.store_outcomes(finished, [batch])
    repo.record_dead_letter("not json", {"raw": "x"}, job_id=None)
    assert _count(engine, "job_metrics") == 14 and _count(engine, "results") == 14

    purged = purge(engine, now - timedelta(days=30), batch=3)  # three batches of jobs
    assert (purged.jobs, purged.batches, purged.dead_letters) == (7, 1, 0)
    left = repo.get_many([j.id for group in jobs.values() for j in group] + [stuck.id])
    assert set(left) == {j.id for j in jobs[recent]} | {stuck.id}
    assert _count(engine, "job_metrics") == 7 and _count(engine, "results") == 7
    assert _count(engine, "batches") == 1 and _count(engine, "dead_letters") == 1
    assert purge(engine, now - timedelta(days=30)).jobs == 0
    engine.dispose()
