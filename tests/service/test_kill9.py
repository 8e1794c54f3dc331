"""kill -9 of a worker process in the middle of a batch: no job lost, no duplicate result."""

from __future__ import annotations

import os
import signal
import time

import pytest
import sqlalchemy as sa
from service_helpers import records, worker_process

from api_client import InferqClient

pytestmark = [pytest.mark.model, pytest.mark.services]
JOBS = 16
# Two sequences at a time and up to 48 tokens each: the 16 jobs take several seconds, so a kill
# or SIGTERM half a second after the first job runs lands mid-run (16 jobs of 16 tokens in one
# batch finished in well under a second once the engine got fast).
SLOW = {"INFERQ_MAX_NUM_SEQS": "2"}
# The victim's jobs and held messages go back once it has been silent this long (the default
# minute would be most of the test's time).
QUICK_DEATH = {
    "INFERQ_HEARTBEAT_S": "1",
    "INFERQ_WORKER_DEAD_AFTER_S": "5",
    "INFERQ_AFFINITY_DEAD_AFTER_S": "5",
}
PARAMS = {"max_tokens": 48}


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill9_mid_batch_loses_nothing_and_duplicates_nothing(
    service_settings, model_path, tmp_path
) -> None:
    client, repo = InferqClient(service_settings), records(service_settings)
    ids = client.submit_many(
        {"prompt": f"List {n} animals:", "params": PARAMS} for n in range(JOBS)
    )
    log = tmp_path / "worker.log"
    first = worker_process(service_settings, model_path, log, "victim", **SLOW, **QUICK_DEATH)
    try:
        _wait(
            lambda: "running" in repo.statuses(ids).values(),
            120,
            "a running batch",
        )
        time.sleep(0.5)  # well inside the run (several seconds of decoding)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = repo.statuses(ids)
    assert "running" in before.values(), "the kill did not land mid-batch"
    # a short drain: once in seven local runs the survivor, all its jobs done, took over 30 s
    # (the default drain) to exit on SIGTERM
    second = worker_process(
        service_settings, model_path, log, "survivor", INFERQ_DRAIN_S="5", **QUICK_DEATH
    )
    try:
        views = client.wait_many(ids, timeout=300)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(30)
    assert [v.status for v in views] == ["done"] * JOBS, log.read_text()[-3000:]
    redelivered = [v for v in views if v.attempts > 1]
    assert redelivered, "no job was redelivered after the kill"
    assert all(v.worker == "survivor" for v in redelivered)
    with repo.engine.connect() as conn:
        per_job = conn.execute(
            sa.text(
                "SELECT job_id, count(*) AS n FROM results WHERE job_id = ANY(:ids) GROUP BY job_id"
            ),
            {"ids": ids},
        ).all()
    assert len(per_job) == JOBS and all(row.n == 1 for row in per_job)


def test_sigterm_mid_run_drains_then_hands_the_rest_back_at_once(
    service_settings, model_path, tmp_path
) -> None:
    """SIGTERM: the worker stops taking jobs, lets running ones finish for INFERQ_DRAIN_S,
    puts the rest back on the queue at once (well before the visibility timeout) and exits 0."""
    client, repo = InferqClient(service_settings), records(service_settings)
    ids = client.submit_many(
        {"prompt": f"List {n} animals:", "params": PARAMS} for n in range(JOBS)
    )
    log = tmp_path / "worker.log"
    first = worker_process(
        service_settings,
        model_path,
        log,
        "draining",
        INFERQ_DRAIN_S="1",
        INFERQ_VISIBILITY_TIMEOUT_S="3600",
        **SLOW,
    )
    try:
        _wait(
            lambda: "running" in repo.statuses(ids).values(),
            120,
            "a running job",
        )
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = repo.statuses(ids)
    assert set(before.values()) <= {"done", "queued"}, before  # what went back is queued again
    assert list(before.values()).count("done") < JOBS, "nothing was left to hand back"
    second = worker_process(service_settings, model_path, log, "next")
    try:
        views = client.wait_many(ids, timeout=300)  # far below the 1 h visibility timeout
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(30)
    assert [v.status for v in views] == ["done"] * JOBS, log.read_text()[-3000:]
    handed_back = [v for v in views if before.get(v.id) != "done"]
    assert handed_back and all(v.worker == "next" for v in handed_back)
    assert all(v.attempts == 1 for v in handed_back), "a hand-back is not a failed attempt"
    assert "intake.requeued" in log.read_text()
