"""Webhooks on the real path: Redis, PostgreSQL, the real model in a worker service in this
process, and a real HTTP receiver on 127.0.0.1 (allowed explicitly, as tests need). What
happened is read back with SQL from `webhook_deliveries` and `webhook_attempts`."""

from __future__ import annotations

import itertools
import json
import socket
import time
import uuid
from datetime import UTC, datetime

import pytest
from service_helpers import producer, records, running_worker
from standardwebhooks import Webhook
from webhook_helpers import (
    OTHER,
    PARAMS,
    SECRET,
    Receiver,
    attempts,
    deliveries,
    settled,
    webhook_settings,
)

from api_client import InferqClient, InvalidJobError
from inferq.callback_urls import address_class
from worker.webhooks.delivery import resolve

pytestmark = [pytest.mark.model, pytest.mark.services]


def test_a_finished_job_posts_one_signed_webhook_that_standardwebhooks_verifies(
    service_settings, paged_engine
) -> None:
    """Done and cancelled jobs each get one webhook, signed with both of the tenant's
    secrets (a rotation), its body the stored outcome; a job without a callback URL none."""
    settings = webhook_settings(
        service_settings, webhook_secrets=f"default={SECRET},default={OTHER}"
    )
    client = InferqClient(settings)
    with Receiver() as receiver:
        cancelled = client.submit("Name a color:", params=PARAMS, callback_url=receiver.url("/c"))
        assert client.cancel(cancelled)  # before any worker: the producer's cancel owes one
        before = time.time()
        with running_worker(settings, {paged_engine.model_name: paged_engine}):
            done = client.submit(
                "List three fruits:", params=PARAMS, callback_url=receiver.url("/d?token=t0k")
            )
            silent = client.submit("Say hi:", params=PARAMS)
            client.wait_many([done, silent], timeout=120)
            rows = settled(records(settings), [done, cancelled])
            time.sleep(1.5)  # nothing more arrives: each delivery was sent once
        hits = {h.path: h for h in receiver.hits}
    assert len(receiver.hits) == 2 and set(hits) == {"/c", "/d?token=t0k"}
    assert deliveries(records(settings), [silent]) == {}
    view = client.get(done)
    for path, job_id, status in (("/d?token=t0k", done, "done"), ("/c", cancelled, "cancelled")):
        hit, row = hits[path], rows[job_id]
        for secret in (SECRET, OTHER):
            payload = Webhook(secret).verify(hit.body, hit.headers)
        assert hit.headers["webhook-id"] == str(row.id)
        assert before - 1 <= int(hit.headers["webhook-timestamp"]) <= time.time() + 1
        assert hit.headers["content-type"] == "application/json"
        assert hit.body.decode() == row.body  # the frozen body, byte for byte
        assert (payload["type"], payload["data"]["status"]) == (f"job.{status}", status)
        assert payload["data"]["job_id"] == str(job_id)
        assert payload["data"]["tenant"] == "default"
        assert (row.state, row.attempts, row.event, row.error) == ("delivered", 1, status, None)
        (tried,) = attempts(records(settings), job_id)
        assert (tried.attempt, tried.status, tried.http_status) == (1, "delivered", 200)
        assert tried.delivery_id == row.id and tried.tenant == "default"
        assert tried.latency_ms >= 0 and tried.started_at <= datetime.now(UTC)
    data = json.loads(hits["/d?token=t0k"].body)["data"]
    result = view.result
    assert (data["text"], data["finish_reason"]) == (result.text, result.finish_reason)
    assert data["usage"] == {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
    }
    assert json.loads(hits["/c"].body)["data"]["text"] is None


def test_refused_targets_fail_their_delivery_with_the_reason_and_nothing_is_sent(
    service_settings, paged_engine
) -> None:
    """With nothing allowed: metadata, private, loopback (by address, by name, by what a
    name resolves to) and plain http are refused at delivery, for jobs sent past the client
    with a plain Celery producer; the client itself refuses them at submit."""
    settings = webhook_settings(service_settings, webhook_allow="")
    client = InferqClient(settings)
    with Receiver() as receiver:
        targets = {
            "https://169.254.169.254/latest/meta-data/": "169.254.169.254 is a metadata address",
            "https://10.0.0.1/hook": "10.0.0.1 is a private address",
            receiver.url(scheme="https"): "127.0.0.1 is a loopback address",
            receiver.url(): "plain http is allowed only to hosts in INFERQ_WEBHOOK_ALLOW",
            receiver.url(scheme="https", host="localhost"): "a local host name",
        }
        for url in targets:  # the client sees these without DNS
            with pytest.raises(InvalidJobError, match="callback_url"):
                client.submit("hi", callback_url=url)
        host = socket.gethostname()  # a name that is not `localhost`: judged once resolved
        kind = {address_class(a) for a in resolve(host, 443)}
        if None not in kind:  # it resolves to no public address here (loopback: /etc/hosts)
            targets[receiver.url(scheme="https", host=host)] = f" is a {sorted(kind)[0]} address"
        sent = {uuid.uuid4(): url for url in targets}
        app = producer(settings)
        for job_id, url in sent.items():
            app.send_task(
                "inferq.generate",
                queue=settings.queue,
                kwargs={
                    "job_id": str(job_id),
                    "prompt": "Say yes:",
                    "params": PARAMS,
                    "callback_url": url,
                },
            )
        with running_worker(settings, {paged_engine.model_name: paged_engine}):
            rows = settled(records(settings), list(sent), timeout=120)
        assert receiver.hits == []
    for job_id, url in sent.items():
        row = rows[job_id]
        assert row.state == "failed" and row.error.startswith("refused: "), row.error
        assert targets[url] in row.error and url not in row.error
        (tried,) = attempts(records(settings), job_id)
        assert (tried.status, tried.http_status, tried.attempt) == ("refused", None, 1)
        assert client.get(job_id).status == "done"  # the job ran: only its webhook failed


def test_a_receiver_that_keeps_failing_is_given_up_after_the_bounded_time(
    service_settings, paged_engine
) -> None:
    """Every attempt answered 500: retried with growing delays for webhook_retry_for_s, then
    given up with the reason; the webhook-id is the same on every attempt. Each retry goes
    when it falls due, not at the next poll (30 s here: longer than the whole test)."""
    settings = webhook_settings(
        service_settings,
        webhook_retry_for_s=3.0,
        webhook_backoff_s=0.25,
        webhook_backoff_cap_s=1.0,
        webhook_poll_s=30.0,
    )
    client = InferqClient(settings)
    with Receiver(default=500) as receiver:
        with running_worker(settings, {paged_engine.model_name: paged_engine}):
            job_id = client.submit("Count to two:", params=PARAMS, callback_url=receiver.url())
            row = settled(records(settings), [job_id], timeout=120)[job_id]
        hits = list(receiver.hits)
    tried = attempts(records(settings), job_id)
    n = len(tried)
    assert row.state == "failed" and n >= 3 and row.attempts == n == len(hits)
    assert row.error.startswith(f"gave up after {n} attempts in ")
    assert row.error.endswith("(retried for at most 3 s); the last: HTTP 500")
    assert [t.attempt for t in tried] == list(range(1, n + 1))
    assert {(t.status, t.http_status, t.error) for t in tried} == {("failed", 500, "HTTP 500")}
    assert {h.headers["webhook-id"] for h in hits} == {str(row.id)}
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in itertools.pairwise(tried)]
    assert all(g >= 0.125 for g in gaps)  # at least half the first delay between attempts
    last = (tried[-1].started_at - row.created_at).total_seconds()
    assert last <= 3.0 + 1.5  # no attempt past the bound (plus a moment)
    assert (row.ended_at - row.created_at).total_seconds() < 3.0 + 5


def test_a_slow_receiver_delays_no_result(service_settings, paged_engine) -> None:
    """A receiver that takes 8 s to answer: while it holds one sender, other jobs' results
    are committed and their webhooks delivered (the sink never waits on HTTP)."""
    settings = webhook_settings(service_settings, webhook_timeout_s=20.0, webhook_senders=2)
    client = InferqClient(settings)
    engines = {paged_engine.model_name: paged_engine}
    with Receiver(delay_s=8.0) as slow, Receiver() as fast, running_worker(settings, engines):
        first = client.submit("Name a city:", params=PARAMS, callback_url=slow.url())
        slow.wait_hits(1, timeout=120)
        held_since = time.monotonic()
        others = [
            client.submit(
                f"Name {n} birds:", params=PARAMS, callback_url=fast.url() if n % 2 else None
            )
            for n in range(6)
        ]
        views = client.wait_many(others, timeout=120)
        fast.wait_hits(3, timeout=30)
        results_in = time.monotonic() - held_since
        assert slow.answered == 0, "the slow receiver answered before the others finished"
        row = settled(records(settings), [first], timeout=60)[first]
    assert [v.status for v in views] == ["done"] * 6 and results_in < 8.0
    assert len(fast.hits) == 3 and row.state == "delivered"
    (tried,) = attempts(records(settings), first)
    assert tried.latency_ms >= 8000 and tried.http_status == 200


def test_only_commits_that_may_owe_a_webhook_wake_the_sender(service_settings, paged_engine):
    """Jobs without a callback URL cost the sender no look at the outbox (its poll is 30 s
    here); a job with one wakes it at once, and its webhook comes well before the poll."""
    settings = webhook_settings(service_settings, webhook_poll_s=30.0)
    client = InferqClient(settings)
    with (
        Receiver() as receiver,
        running_worker(settings, {paged_engine.model_name: paged_engine}) as service,
    ):
        wakes: list[float] = []
        wake = service.webhooks.wake
        service.webhooks.wake = lambda: (wakes.append(time.time()), wake())[-1]
        silent = [client.submit("Say hi:", params=PARAMS) for _ in range(4)]
        client.wait_many(silent, timeout=120)
        time.sleep(0.5)  # the sink acknowledges after the results are published
        assert wakes == []
        owed = client.submit("Name a color:", params=PARAMS, callback_url=receiver.url("/o"))
        client.wait(owed, timeout=120)
        deadline = time.time() + 10
        while not receiver.hits and time.time() < deadline:
            time.sleep(0.05)
    assert len(wakes) == 1
    assert [h.path for h in receiver.hits] == ["/o"]
