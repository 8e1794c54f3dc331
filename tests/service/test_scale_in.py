"""Scale-in, as an autoscaler does it: four `inferq worker` processes (null engine) on the real
Redis and PostgreSQL work through a backlog; three get SIGTERM at once while each holds
messages it has not run (a drain of 0 s: the worst case, when running jobs outlast the grace
period). Every
job ends done with exactly one result, the rest on the survivor once the others have
stopped."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis
import sqlalchemy as sa
from service_helpers import records, worker_process

from api_client import InferqClient
from worker.broker.layout import affinity_queue, held_key, queue_depth

pytestmark = pytest.mark.services
WORKERS = ["w0", "w1", "w2", "w3"]
SURVIVOR = "w0"
JOBS = 6000
# prompts over 8 shared prefixes of more than one KV block: prefix affinity routes jobs to
# their owners' own queues, which a stopping worker must hand back too
PREFIXES = [f"Desk {d}: you answer questions about invoices, carefully. " for d in range(8)]
WORKER_ENV = {
    "INFERQ_ENGINE": "null",
    "INFERQ_DRAIN_S": "0",  # hand back everything held at once
    "INFERQ_HEARTBEAT_S": "1",
    "INFERQ_AFFINITY_DEAD_AFTER_S": "5",
}


def _wait(predicate, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _requeued(log: str) -> int:
    """Messages a worker put back on the queue when it stopped (its `intake.requeued`)."""
    events = (json.loads(line) for line in log.splitlines() if line.startswith("{"))
    return sum(e["messages"] for e in events if e.get("event") == "intake.requeued")


def _done(engine: sa.Engine, ids: list) -> int:
    """This test's jobs that are done (the database holds other tests' jobs too)."""
    with engine.connect() as conn:
        return conn.scalar(
            sa.text("SELECT count(*) FROM jobs WHERE status = 'done' AND id = ANY(:ids)"),
            {"ids": ids},
        )


def test_sigterm_three_of_four_workers_mid_run_loses_and_duplicates_nothing(
    service_settings, tmp_path
) -> None:
    client, repo = InferqClient(service_settings), records(service_settings)
    broker, queue = redis.Redis.from_url(service_settings.broker_url), service_settings.queue
    ids = client.submit_many(  # the backlog a scale-out was for
        {"prompt": f"{PREFIXES[i % len(PREFIXES)]}Question {i}?", "params": {"max_tokens": 4}}
        for i in range(JOBS)
    )
    logs = {n: tmp_path / f"{n}.log" for n in WORKERS}
    procs = {
        n: worker_process(service_settings, "", logs[n], n, **WORKER_ENV) for n in WORKERS
    }  # the model path is unused by the null engine
    try:
        for name in WORKERS:
            _wait(lambda n=name: '"worker.ready"' in logs[n].read_text(), 60, f"{name} ready")
        _wait(lambda: _done(repo.engine, ids) >= JOBS // 5, 60, "a fifth of the jobs done")
        stopping = [n for n in WORKERS if n != SURVIVOR]
        # An instant engine leaves almost nothing in flight at a random moment: hold the
        # jobs table's writes for a moment, so each worker sits on messages it has taken
        # and not yet claimed when the SIGTERM comes (a scale-in during a slow database).
        with repo.engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("LOCK TABLE jobs IN EXCLUSIVE MODE")
            _wait(
                lambda: all(broker.scard(held_key(queue, n)) for n in stopping),
                10,
                "every stopping worker holding messages",
            )
            for name in stopping:  # a scale-in 4 -> 1: all at once
                procs[name].send_signal(signal.SIGTERM)
            done_at_stop, stopped_at = _done(repo.engine, ids), time.monotonic()
            time.sleep(0.5)  # the signals are handled: the engines stop taking work
        for name in stopping:
            assert procs[name].wait(30) == 0, logs[name].read_text()[-2000:]
        views = client.wait_many(ids, timeout=45)
        all_done_s = time.monotonic() - stopped_at
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
    assert done_at_stop < JOBS, "the backlog was gone before the scale-in"
    handed_back = {n: _requeued(logs[n].read_text()) for n in stopping}
    assert sum(handed_back.values()) > 0, f"no stopping worker held a message: {handed_back}"
    statuses = [v.status for v in views]
    assert statuses.count("done") == JOBS, {s: statuses.count(s) for s in set(statuses)}
    with repo.engine.connect() as conn:
        per_job = dict(
            conn.execute(
                sa.text(
                    "SELECT job_id, count(*) FROM results WHERE job_id = ANY(:ids) GROUP BY job_id"
                ),
                {"ids": ids},
            ).all()
        )
        late = conn.execute(
            sa.text(
                "SELECT DISTINCT m.worker FROM job_metrics m JOIN workers w ON "
                "w.name = m.worker WHERE m.job_id = ANY(:ids) AND w.stopped_at IS NOT NULL "
                "AND m.finished_at > w.stopped_at"
            ),
            {"ids": ids},
        ).all()
        facts = conn.execute(
            sa.text(
                "SELECT count(*) FILTER (WHERE attempts > 1), count(*) FILTER (WHERE "
                "resends > 0) FROM jobs WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        ).one()
    print(
        f"scale-in 4 -> 1 at {done_at_stop}/{JOBS} done: handed back {handed_back}, all done "
        f"{all_done_s:.1f} s after SIGTERM; attempts > 1: {facts[0]}, sent again by a "
        f"sweeper: {facts[1]}"
    )
    assert len(per_job) == JOBS and set(per_job.values()) == {1}  # 0 lost, 0 duplicates
    assert not late, f"a stopped worker finished jobs after it stopped: {late}"
    assert queue_depth(broker, queue) == 0
    assert not any(broker.llen(affinity_queue(queue, n)) for n in WORKERS)
    assert sum(handed_back.values()) > 0  # the stopping workers did hold messages
    assert tuple(facts) == (0, 0), "a hand-back counted an attempt or waited for a sweeper"
