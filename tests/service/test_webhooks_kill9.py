"""A webhook receiver answers 500 twice, then 200; the worker sending it is killed (kill -9)
between the second and third attempts and another worker takes the delivery over: exactly
one successful attempt row, and the callback is not lost (issue 27's done-when)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from service_helpers import records, worker_process
from standardwebhooks import Webhook
from webhook_helpers import PARAMS, SECRET, Receiver, attempts, deliveries, webhook_settings

from api_client import InferqClient

pytestmark = [pytest.mark.model, pytest.mark.services]
TOKEN = "t0k3n-in-the-url-never-logged"
# retries 1-2 s, then 2-4 s after a failure: time to see the second attempt's row and kill
WEBHOOK_ENV = {
    "INFERQ_WEBHOOK_SECRETS": f"default={SECRET}",
    "INFERQ_WEBHOOK_ALLOW": "127.0.0.1",
    "INFERQ_WEBHOOK_BACKOFF_S": "2",
    "INFERQ_WEBHOOK_BACKOFF_CAP_S": "4",
    "INFERQ_DRAIN_S": "2",
}


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill9_between_attempts_loses_no_callback_and_delivers_once(
    service_settings, model_path, tmp_path
) -> None:
    settings = webhook_settings(service_settings)
    repo = records(settings)
    client = InferqClient(settings)
    log = tmp_path / "workers.log"
    with Receiver(statuses=[500, 500]) as receiver:
        job_id = client.submit(
            "List two animals:", params=PARAMS, callback_url=receiver.url(f"/hook?token={TOKEN}")
        )
        victim = worker_process(settings, model_path, log, "victim", **WEBHOOK_ENV)
        try:
            _wait(lambda: len(attempts(repo, job_id)) == 2, 180, "two failed attempts")
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
        finally:
            if victim.poll() is None:
                os.killpg(victim.pid, signal.SIGKILL)
        (before,) = deliveries(repo, [job_id]).values()
        assert before.state == "pending" and len(receiver.hits) == 2, "not killed in between"
        survivor = worker_process(settings, model_path, log, "survivor", **WEBHOOK_ENV)
        try:
            _wait(
                lambda: deliveries(repo, [job_id])[job_id].state != "pending",
                180,
                "the delivery to end",
            )
            time.sleep(1.0)  # nothing more is sent
        finally:
            os.killpg(survivor.pid, signal.SIGTERM)
            survivor.wait(30)
        hits = list(receiver.hits)
    row = deliveries(repo, [job_id])[job_id]
    tried = [(t.attempt, t.status, t.http_status, t.worker) for t in attempts(repo, job_id)]
    assert tried == [
        (1, "failed", 500, "victim"),
        (2, "failed", 500, "victim"),
        (3, "delivered", 200, "survivor"),
    ], log.read_text()[-3000:]
    assert (row.state, row.attempts, row.error) == ("delivered", 3, None)
    assert len(hits) == 3 and {h.headers["webhook-id"] for h in hits} == {str(row.id)}
    assert {h.body for h in hits} == {row.body.encode()}  # the same body on every attempt
    payloads = [Webhook(SECRET).verify(h.body, h.headers) for h in hits]
    view = client.get(job_id)
    assert payloads[-1]["data"]["text"] == view.result.text and view.status == "done"
    logged = log.read_text()
    assert "webhook.attempt" in logged
    text = json.dumps(view.result.text)  # as a JSON log line would hold it
    for secret in (SECRET.removeprefix("whsec_"), TOKEN, *([text] if len(text) > 12 else [])):
        assert secret not in logged  # secrets, URLs and bodies stay out of the logs
