"""Issue 25, finding 10: dead letters are bounded. The error text is capped, a flood of one
reason folds into one row per reason and minute (the Prometheus counter still counts each
message), and the worker deletes old dead letters and ended jobs on a schedule."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
import sqlalchemy as sa
from service_helpers import envelope as _envelope
from service_helpers import running_worker, wait_for

from storage.models import dead_letters_table, jobs_table
from storage.records import NewJob
from storage.repository import MAX_ERROR_CHARS, Repository

pytestmark = [pytest.mark.services]


@pytest.fixture
def settings(service_settings):
    return service_settings.model_copy(update={"engine": "null", "dead_letters_per_minute": 3})


def _letters(repo: Repository, since: datetime) -> list[dict]:
    return [d for d in repo.dead_letters(1000) if d["received_at"] >= since]


def test_dead_letter_error_text_is_capped(settings) -> None:
    """A ValidationError with 60,000 unknown keys is megabytes of text; 4 KB is kept."""
    q, r = settings.queue, redis.Redis.from_url(settings.broker_url)
    kwargs = {"prompt": "x", **{f"k{i}": 0 for i in range(60_000)}}
    r.lpush(q, _envelope(q, json.dumps([[], kwargs, {}])))
    started = datetime.now(UTC)
    with running_worker(settings, {}) as worker:
        deadline = time.monotonic() + 30
        while not (letters := _letters(worker.repo, started)) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [d["reason"] for d in letters] == ["invalid job message"]
    error = letters[0]["error"]
    assert len(error) <= MAX_ERROR_CHARS and "60000 validation errors" in error
    assert error.endswith("characters in all]")


def test_dead_letter_flood_is_folded_per_reason(settings) -> None:
    """20 unknown-task and 5 non-JSON messages in a minute, 3 kept whole per reason: 3 + 1
    folded row each, the folded rows count the rest (with their SHA-256s), the counter all."""
    q, r = settings.queue, redis.Redis.from_url(settings.broker_url)
    for i in range(20):
        r.lpush(
            q,
            _envelope(
                q,
                json.dumps([[], {"prompt": f"x{i}"}, {}]),
                task=f"other.{i}",
                origin="gen1@producer",
            ),
        )
    for i in range(5):
        r.lpush(q, f"not json {i}")
    after = uuid.uuid4()
    body = json.dumps([[], {"job_id": str(after), "prompt": "Hi", "params": {"max_tokens": 2}}, {}])
    r.lpush(q, _envelope(q, body))
    started = datetime.now(UTC)
    with running_worker(settings, {}) as worker:
        assert wait_for(worker.repo, [after], timeout=30)[after].status == "done"
        counter = worker.metrics.registry.get_sample_value
        counts = {
            reason: counter("inferq_dead_letters_total", {"reason": reason})
            for reason in ("unknown task name", "non-JSON message refused")
        }
        letters = _letters(worker.repo, started)
    assert counts == {"unknown task name": 20, "non-JSON message refused": 5}
    for reason, total in (("unknown task name", 20), ("non-JSON message refused", 5)):
        rows = [d for d in letters if d["reason"] == reason]
        whole = [d for d in rows if "folded" not in d["payload"]]
        folded = [d["payload"] for d in rows if "folded" in d["payload"]]
        assert len(whole) == 3 and len(folded) == 1, [d["payload"] for d in rows]
        assert folded[0]["folded"] == total - 3 == len(folded[0]["sha256"])
    unknown = next(
        d
        for d in letters
        if d["reason"] == "unknown task name" and d["job_id"] is None and "folded" in d["payload"]
    )
    assert unknown["payload"]["sources"] == {"gen1@producer": 17}
    assert r.hlen("unacked") == 0


def test_worker_purges_old_dead_letters_and_jobs_on_a_schedule(settings) -> None:
    """At start (then hourly) a worker deletes dead letters past `dead_letter_retention_days`
    and ended jobs past `retention_days`; active jobs and fresh rows stay."""
    repo = Repository(settings.database_url)
    old_letter = repo.record_dead_letter("test: old", {}, "old", job_id=None)
    new_letter = repo.record_dead_letter("test: new", {}, "new", job_id=None)
    ended, active = uuid.uuid4(), uuid.uuid4()
    long_ago = datetime.now(UTC) - timedelta(days=40)
    for job_id in (ended, active):
        repo.submit(NewJob(job_id, "keeper", "m", prompt="x", queued_at=long_ago))
    D, J = dead_letters_table, jobs_table
    with repo.writer.begin() as conn:
        conn.execute(sa.update(D).where(D.c.id == old_letter).values(received_at=long_ago))
        conn.execute(sa.update(J).where(J.c.id == ended).values(status="cancelled"))
    keeping = settings.model_copy(
        update={"dead_letter_retention_days": 7.0, "retention_days": 30.0, "requeue_after_s": 1e6}
    )
    with running_worker(keeping, {}):
        deadline = time.monotonic() + 20
        while repo.get(ended) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
    with repo.engine.connect() as conn:
        left = set(conn.scalars(sa.select(D.c.id).where(D.c.id.in_([old_letter, new_letter]))))
    assert left == {new_letter}
    assert repo.get(ended) is None and repo.get(active) is not None
