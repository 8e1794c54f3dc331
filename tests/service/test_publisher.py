"""The result publisher writes what the claim and the result sink committed, as their own
transactions left it, without reading the database again; and a state that comes late never
replaces a newer one. On the real Redis and PostgreSQL (null engines)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from service_helpers import GatedEngine, producer, running_worker, wait_status

from api_client import InferqClient
from api_client.results import result_key, stream_key
from inferq.settings import get_settings
from storage.records import JobView, ResultRow
from storage.repository import EndedJob, NewJob, Repository
from worker.service.metrics import Metrics
from worker.service.publisher import ResultPublisher

pytestmark = pytest.mark.services


class ReadCounting(Repository):
    """The worker's repository, counting the jobs each thread reads with `get_many`."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reads: dict[str, int] = {}

    def get_many(self, ids, tenant=None):
        ids = list(ids)
        name = threading.current_thread().name
        self.reads[name] = self.reads.get(name, 0) + len(ids)
        return super().get_many(ids, tenant)


class NoReads(Repository):
    def __init__(self) -> None:
        pass

    def get_many(self, ids, tenant=None):
        raise AssertionError("the publisher read the database")


def _view(job_id: uuid.UUID, status: str, error: str | None = None) -> JobView:
    now = datetime.now(UTC)
    ended = None if status == "running" else now
    view = JobView(job_id, "t", "m", status, 0, 1, error, now, now, ended, "w", None)
    if status == "done":
        view.result = ResultRow(job_id, "text", "stop", 1, 1, 0)
    return view


def test_claimed_and_committed_states_are_published_without_reading_them_again(
    service_settings,
) -> None:
    settings = service_settings.model_copy(
        update={"model": "null", "affinity": False, "max_prompt_tokens": 16}
    )
    repo = ReadCounting(settings.database_url)
    client = InferqClient(settings, tenant="acme")
    gated = GatedEngine()
    with running_worker(settings, {"null": gated}, repo=repo):
        jobs = client.submit_many(
            {"prompt": f"job {n}", "params": {"max_tokens": 2}} for n in range(20)
        )
        refused = client.submit("word " * 40)  # over max_prompt_tokens: failed by its claim
        stale = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        sent = producer(settings).send_task(  # expired by its claim
            "inferq.generate",
            queue=settings.queue,
            kwargs={"prompt": "Late.", "tenant": "acme", "ttl_s": 1, "submitted_at": stale},
        )
        late = uuid.UUID(sent.id)
        started = [wait_status(client, j, "running") for j in jobs]
        claimed = repo.get_many(jobs)
        assert [v.to_dict() for v in started] == [claimed[j].to_dict() for j in jobs]
        gated.gate.set()
        ended = client.wait_many([*jobs, refused, late], timeout=60)
        stored = repo.get_many([*jobs, refused, late])
    assert [v.to_dict() for v in ended] == [stored[v.id].to_dict() for v in ended]
    assert [v.status for v in ended[-2:]] == ["failed", "expired"]
    assert all(v.status == "done" and v.metrics is not None for v in ended[:-2])
    assert repo.reads.get("inferq-results", 0) == 0  # what the claim and the sink handed over


def test_the_views_a_transaction_hands_over_are_what_it_committed(pg_url: str) -> None:
    repo = Repository(pg_url)
    jobs = [NewJob(uuid.uuid4(), "t", "m", prompt=f"p{n}") for n in range(4)]
    done, failed, expired, cancelled = (j.id for j in jobs)
    states = repo.claim(jobs, "w1")
    assert {i: s.view.to_dict() for i, s in states.items()} == {
        i: v.to_dict() for i, v in repo.get_many(states).items()
    }
    assert {s.view.status for s in states.values()} == {"running"}
    assert repo.cancel(cancelled)  # a cancel that races the result: the job stays cancelled
    now = datetime.now(UTC)
    finished = [
        EndedJob(
            i,
            "m",
            "w1",
            "cpu",
            now,
            0.5,
            "out",
            "stop",
            first_token_at=now,
            prompt_tokens=3,
            completion_tokens=2,
        )
        for i in (done, cancelled)
    ]
    views: dict[uuid.UUID, JobView] = {}
    repo.store_outcomes(finished, (), {failed: "boom"}, [expired], views=views)
    stored = repo.get_many([done, failed, expired, cancelled])
    assert {i: v.to_dict() for i, v in views.items()} == {i: v.to_dict() for i, v in stored.items()}
    assert [views[i].status for i in (done, failed, expired, cancelled)] == [
        "done",
        "failed",
        "expired",
        "cancelled",
    ]
    assert views[done].result is not None and views[done].metrics is not None


def test_a_state_that_comes_late_never_replaces_a_newer_one(redis_url: str) -> None:
    settings = get_settings(broker_url=redis_url)
    r = redis.Redis.from_url(redis_url)
    publisher = ResultPublisher(settings, NoReads(), r, Metrics())
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    r.xadd(stream_key(b), {"o": "0", "d": "x"})
    pubsub = r.pubsub()
    pubsub.subscribe(result_key(a), result_key(b))
    for _ in range(2):  # both subscriptions confirmed
        assert pubsub.get_message(timeout=5.0)["type"] == "subscribe"

    def stored(job_id: uuid.UUID) -> str:
        return JobView.from_dict(_job_of(r.get(result_key(job_id)))).status

    publisher.write({a: _view(a, "done")})
    publisher.write({a: _view(a, "running"), b: _view(b, "failed", "boom")})
    assert (stored(a), stored(b)) == ("done", "failed")  # STARTED never over an end
    publisher.write({a: _view(a, "failed", "late"), c: _view(c, "running")})
    assert (stored(a), stored(c)) == ("done", "running")  # nothing over SUCCESS
    publisher.write({b: _view(b, "done")})  # failed, then done: the one end that follows another
    assert stored(b) == "done"
    entries = r.xrange(stream_key(b))
    assert [e[1] for e in entries] == [{b"o": b"0", b"d": b"x"}, {b"end": b"failed"}]
    assert not r.exists(stream_key(a))  # no stream is made for an end
    heard = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        heard.append((message["channel"].decode(), message["data"]))
    assert [channel for channel, _ in heard] == [result_key(a), result_key(b), result_key(b)]
    assert heard[0][1] == r.get(result_key(a)) and heard[2][1] == r.get(result_key(b))
    assert JobView.from_dict(_job_of(heard[1][1])).status == "failed"
    assert r.pttl(result_key(a)) > 0


def _job_of(raw: bytes | None) -> dict:
    """The job a stored meta holds (under `job` for an end without a result)."""
    assert raw is not None
    meta = json.loads(raw)
    return meta.get("job") or meta["result"]


def test_a_waiting_handoff_returns_once_written_and_not_through_an_outage(
    redis_url: str,
) -> None:
    """`publish_views(wait=True)` (the sink's) returns once the thread has written the views;
    while Redis is away it returns after the first failed try and the thread retries on."""
    settings = get_settings(broker_url=redis_url)
    publisher = ResultPublisher(settings, NoReads(), redis.Redis.from_url(redis_url), Metrics())
    publisher.start()
    a = uuid.uuid4()
    publisher.publish_views([_view(a, "done")], wait=True)
    r = redis.Redis.from_url(redis_url)
    assert r.get(result_key(a)) is not None  # written before the call returned
    nobody = redis.Redis(port=1, retry=Retry(NoBackoff(), 0))  # nothing listens there
    away = ResultPublisher(settings, NoReads(), nobody, Metrics())
    away.start()
    t0 = time.monotonic()
    away.publish_views([_view(uuid.uuid4(), "done")], wait=True)
    assert time.monotonic() - t0 < 0.9  # the first failure released it, before HANDOFF_WAIT_S
    publisher.stop()
    away.stop(timeout=0.5)
