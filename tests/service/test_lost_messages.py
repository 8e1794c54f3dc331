"""Messages the broker lost (Redis restarted without persistence, a dead worker's unacked
set gone with it): PostgreSQL still has the jobs, and the sweeper sends them again."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis
import sqlalchemy as sa
from service_helpers import records, running_worker

from api_client import InferqClient
from storage.records import utcnow

pytestmark = [pytest.mark.model, pytest.mark.services]


def test_jobs_whose_messages_were_lost_are_sent_again_and_run_once(
    service_settings, paged_engine
) -> None:
    settings = service_settings.model_copy(
        update={"heartbeat_s": 0.2, "requeue_after_s": 1.0, "worker_dead_after_s": 1.0}
    )
    client, repo = InferqClient(settings), records(settings)
    # recorded (a producer sends through the broker only: a job is recorded when a worker
    # takes it; these were taken, or recorded by an operator) and queued, then lost
    messages = [client.build(f"Say {n}.", params={"max_tokens": 3}) for n in range(4)]
    queued = [repo.submit(m.to_job(settings.model))[0] for m in messages]
    for message in messages:
        client.enqueue(message)
    message = client.build("Say ghost.", params={"max_tokens": 3})
    ghost = client.enqueue(message)
    # a worker claimed it (its message: the same job) and died; the message went with Redis
    row = message.to_job(settings.model)
    repo.claim([row], "ghost-worker", now=utcnow() - timedelta(seconds=30))
    redis.Redis.from_url(settings.broker_url).flushdb()  # every message is gone
    assert repo.statuses([ghost])[ghost] == "running"
    with running_worker(settings, {paged_engine.model_name: paged_engine}):
        views = client.wait_many([*queued, ghost], timeout=120)
    assert [v.status for v in views] == ["done"] * 5
    assert views[-1].attempts == 2 and views[-1].worker != "ghost-worker"
    assert all(v.attempts == 1 for v in views[:-1])


def test_redis_loses_everything_and_drops_connections_mid_run(service_settings, paged_engine):
    """Jobs queued and running when Redis forgets every key and cuts every connection (a
    restart without persistence): the running ones finish, the queued ones are sent again,
    each job ends with one result."""
    settings = service_settings.model_copy(
        update={"heartbeat_s": 0.2, "requeue_after_s": 2.0, "max_num_seqs": 2}
    )
    client = InferqClient(settings)
    r = redis.Redis.from_url(settings.broker_url)
    with running_worker(settings, {paged_engine.model_name: paged_engine}):
        ids = client.submit_many(
            {"prompt": f"List {n} colors:", "params": {"max_tokens": 24}} for n in range(10)
        )
        deadline, repo = time.monotonic() + 60, records(settings)
        while not (  # every job taken (recorded), some running
            len(statuses := repo.statuses(ids)) == len(ids) and "running" in statuses.values()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r.flushdb()
        r.client_kill_filter(_type="normal", skipme=True)
        views = repo.wait_ended(ids, timeout=180)  # the results Redis had are gone with it
    assert [v.status for v in views] == ["done"] * len(ids)
    with records(settings).engine.connect() as conn:
        counts = (
            conn.execute(
                sa.text("SELECT count(*) FROM results WHERE job_id = ANY(:ids) GROUP BY job_id"),
                {"ids": ids},
            )
            .scalars()
            .all()
        )
    assert counts == [1] * len(ids)
