"""Celery-native results: a plain Celery producer (celery alone, no inferq module loaded, in a
process of its own) gets its results with `send_task(...).get()`, and `app.control.revoke`
cancels, on the real Redis, PostgreSQL, worker and model."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from service_helpers import running_worker

from api_client.results import result_key

pytestmark = pytest.mark.services

# The producer: Celery only. It prints, per case, what `.get()` returned or raised.
PRODUCER = r"""
import json, sys, time
from celery import Celery

url, queue, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
app = Celery("backend", broker=url, backend=url, set_as_current=False)
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
out = {}
for case in cases:
    if case.get("revoke_first"):  # revoked before it is even sent
        app.control.revoke(case["task_id"])
        time.sleep(0.5)
    res = app.send_task("inferq.generate", kwargs=case["kwargs"], queue=queue,
                        task_id=case.get("task_id"))
    if case.get("revoke_when_started"):
        deadline = time.monotonic() + 60
        while res.state != "STARTED" and time.monotonic() < deadline:
            time.sleep(0.05)
        out[case["name"] + ":seen"] = res.state
        app.control.revoke(res.id)
    try:
        got = {"value": res.get(timeout=120)}
    except Exception as exc:
        got = {"raised": type(exc).__name__, "args": [str(a) for a in exc.args]}
    out[case["name"]] = {**got, "id": res.id, "state": res.state}
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("api_client", "inferq", "worker",
                                                              "storage"))
out["loaded"] = ours
print(json.dumps(out))
"""


def _produce(url: str, queue: str, cases: list[dict]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER, url, queue, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout)
    assert out.pop("loaded") == []  # a producer with nothing of inferq
    return out


def test_a_plain_celery_producer_gets_success_failure_and_expiry(
    service_settings, paged_engine
) -> None:
    settings = service_settings.model_copy(update={"max_prompt_tokens": 64})
    long_prompt = "word " * 400
    stale = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    cases = [
        {
            "name": "ok",
            "kwargs": {"prompt": "The capital of France is", "params": {"max_tokens": 6}},
        },
        {"name": "refused", "kwargs": {"prompt": long_prompt, "params": {"max_tokens": 4}}},
        {"name": "expired", "kwargs": {"prompt": "Late.", "submitted_at": stale, "ttl_s": 1}},
    ]
    with running_worker(settings, {paged_engine.model_name: paged_engine}) as worker:
        out = _produce(settings.broker_url, settings.queue, cases)
        views = worker.repo.get_many([uuid.UUID(out[c["name"]]["id"]) for c in cases])

    ok = out["ok"]
    assert ok["state"] == "SUCCESS"
    view = views[uuid.UUID(ok["id"])]  # the job id is the Celery task id
    assert ok["value"]["id"] == ok["id"] == str(view.id)
    assert ok["value"]["status"] == "done"
    assert ok["value"]["result"]["text"] == view.result.text and view.result.text
    assert ok["value"]["result"]["completion_tokens"] == view.result.completion_tokens
    assert ok["value"]["metrics"]["prefill_s"] is not None  # (no submitted_at: no queue wait)

    refused = out["refused"]
    assert (refused["state"], refused["raised"]) == ("FAILURE", "JobFailed")
    assert "prompt has" in refused["args"][0]
    assert views[uuid.UUID(refused["id"])].error == refused["args"][0]

    expired = out["expired"]
    assert (expired["state"], expired["raised"]) == ("FAILURE", "JobExpired")
    assert views[uuid.UUID(expired["id"])].status == "expired"

    ttl = redis.Redis.from_url(settings.broker_url).ttl(result_key(ok["id"]))
    assert 0 < ttl <= settings.result_expires_s  # expiring; PostgreSQL keeps the row


def test_celery_revoke_cancels_queued_and_running_jobs(service_settings, paged_engine) -> None:
    early = str(uuid.uuid4())
    cases = [
        {
            "name": "early",
            "task_id": early,
            "revoke_first": True,
            "kwargs": {"prompt": "Never run.", "params": {"max_tokens": 4}},
        },
        {
            "name": "running",
            "revoke_when_started": True,
            "kwargs": {
                "prompt": "Count slowly from one to one thousand:",
                "params": {"max_tokens": 400},
            },
        },
        {"name": "after", "kwargs": {"prompt": "Say hi.", "params": {"max_tokens": 4}}},
    ]
    with running_worker(service_settings, {paged_engine.model_name: paged_engine}) as worker:
        out = _produce(service_settings.broker_url, service_settings.queue, cases)
        views = worker.repo.get_many([uuid.UUID(out[c["name"]]["id"]) for c in cases])
    for name in ("early", "running"):
        assert out[name]["state"] == "REVOKED"
        assert out[name]["raised"] == "TaskRevokedError"
        view = views[uuid.UUID(out[name]["id"])]
        assert view.status == "cancelled" and view.result is None
    assert out["running:seen"] == "STARTED"
    assert views[uuid.UUID(out["early"]["id"])].started_at is not None  # claimed, never run
    assert out["after"]["state"] == "SUCCESS"  # the worker keeps serving
