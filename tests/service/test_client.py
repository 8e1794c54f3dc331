"""The client on the real Redis broker: validation, enqueueing, the wire format, reading back."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from service_helpers import running_worker

from api_client import InferqClient, InvalidJobError, ResultsUnavailable
from api_client.wire import TASK_NAME
from worker.engine.null import NullEngine

pytestmark = pytest.mark.services

WIRE_KEYS = {
    "job_id",
    "tenant",
    "model",
    "prompt",
    "messages",
    "params",
    "priority",
    "idempotency_key",
    "submitted_at",
    "ttl_s",
}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(service_settings) -> Iterator[InferqClient]:
    c = InferqClient(service_settings)
    yield c
    c.celery.close()


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


def _queued(r: redis.Redis, queue: str) -> list[bytes]:
    """Every message on `queue`, across the transport's per-priority lists."""
    return [m for key in sorted(r.keys(queue + "*")) for m in r.lrange(key, 0, -1)]


def _decode(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(headers, task kwargs) of a kombu Redis envelope carrying a JSON Celery message."""
    env = json.loads(raw)
    assert env["content-type"] == "application/json"
    assert env["properties"]["body_encoding"] == "base64"
    args, kwargs, _embed = json.loads(base64.b64decode(env["body"]))
    assert args == []
    return env["headers"], kwargs


# -- validation: refused before anything is stored or enqueued ----------------------------

BAD_JOBS = [
    ({"prompt": "hi", "params": {"max_tokens": 0}}, "params.max_tokens"),
    ({"prompt": "hi", "params": {"temperature": -1}}, "params.temperature"),
    ({"prompt": "hi", "params": {"top_p": 0}}, "params.top_p"),
    ({"prompt": "hi", "params": {"max_tokens": 4, "bogus": 1}}, "params.bogus"),
    ({"prompt": "hi", "params": {"stop": ["ok", ""]}}, "stop"),
    ({"prompt": "hi", "messages": USER}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "  \n"}, "prompt"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"prompt": "hi", "priority": 10}, "priority"),
    ({"prompt": "hi", "tenant": "acme corp"}, "tenant"),
    ({"prompt": "hi", "tenant": "a/b"}, "tenant"),
]


@pytest.mark.parametrize(("job", "field"), BAD_JOBS, ids=[f for _, f in BAD_JOBS])
def test_invalid_job_is_refused_and_nothing_is_enqueued(
    client: InferqClient, broker: redis.Redis, job: dict[str, Any], field: str
) -> None:
    submitter = client.for_tenant(job.pop("tenant")) if "tenant" in job else client
    with pytest.raises(InvalidJobError) as err:
        submitter.submit(**job)
    assert str(err.value).startswith("invalid job: ")
    assert field in str(err.value)
    assert isinstance(err.value, ValueError)
    assert _queued(broker, client.settings.queue) == []


def test_submit_many_with_one_bad_job_enqueues_none(
    client: InferqClient, broker: redis.Redis
) -> None:
    jobs = [
        {"prompt": "one"},
        {"messages": USER, "params": {"max_tokens": 3}},
        {"prompt": "three", "params": {"top_k": -1}},
    ]
    with pytest.raises(InvalidJobError, match=r"params\.top_k"):
        client.submit_many(jobs)
    assert _queued(broker, client.settings.queue) == []
    ids = client.submit_many(jobs[:2])
    assert len(set(ids)) == 2
    assert len(_queued(broker, client.settings.queue)) == 2


# -- good submits: the message on the wire (nothing else: no database) --------------------


def test_submit_enqueues_a_json_message(client: InferqClient, broker: redis.Redis) -> None:
    queue = client.settings.queue
    params = {"max_tokens": 5, "temperature": 0.7, "top_k": 3, "seed": 11, "stop": ["\n"]}
    client = client.for_tenant("acme.eu:1")
    job_id = client.submit("Hello there", params=params, priority=7)
    assert isinstance(job_id, uuid.UUID)
    assert client.get(job_id) is None  # queued: no state yet (Celery's PENDING)

    (raw,) = _queued(broker, queue)
    headers, kwargs = _decode(raw)
    assert headers["task"] == TASK_NAME == "inferq.generate"
    assert headers["id"] == str(job_id)
    assert set(kwargs) == WIRE_KEYS
    assert kwargs["job_id"] == str(job_id)
    assert kwargs["tenant"] == "acme.eu:1"
    assert kwargs["model"] == client.settings.model
    assert kwargs["prompt"] == "Hello there" and kwargs["messages"] is None
    assert kwargs["params"] == {**params, "top_p": 1.0}
    assert kwargs["priority"] == 7
    assert kwargs["idempotency_key"] is None
    submitted = datetime.fromisoformat(kwargs["submitted_at"])
    assert submitted.utcoffset() is not None
    assert abs(submitted.timestamp() - time.time()) < 60


def test_submit_chat_messages_and_priority_lists(client: InferqClient, broker: redis.Redis) -> None:
    queue = client.settings.queue
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    low = client.submit(messages=msgs, model="other-model")
    high = client.submit("urgent", priority=9)
    # the Redis transport keeps one list per priority step; ours is inverted onto its scale
    lists = {key: broker.lrange(key, 0, -1) for key in broker.keys(queue + "*")}
    assert len(lists) == 2 and all(len(v) == 1 for v in lists.values())
    by_id = {_decode(v[0])[1]["job_id"]: (k, _decode(v[0])[1]) for k, v in lists.items()}
    assert by_id[str(high)][0] == queue.encode()  # celery priority 0: the plain list
    key, kwargs = by_id[str(low)]
    assert key != queue.encode() and key.startswith(queue.encode())
    assert kwargs["messages"] == msgs and kwargs["prompt"] is None
    assert kwargs["model"] == "other-model"
    assert kwargs["params"]["max_tokens"] == 64  # the documented default


def test_idempotency_key_names_one_job_per_tenant(client: InferqClient, broker: redis.Redis):
    queue = client.settings.queue
    tenant_a = client.for_tenant(f"t-{uuid.uuid4().hex[:8]}")
    tenant_b = client.for_tenant(tenant_a.tenant + "x")
    signed_a = client.for_tenant(tenant_a.tenant, key="k" * 32)
    first = tenant_a.submit("same", idempotency_key="k-1")
    again = tenant_a.submit("same", idempotency_key="k-1")
    assert again == first  # the same job: the worker runs it once
    assert tenant_a.submit("same", idempotency_key="k-2") != first
    assert tenant_b.submit("same", idempotency_key="k-1") != first  # keys are per tenant
    assert signed_a.build("same", idempotency_key="k-1").job_id != first  # keyed by the key
    messages = [_decode(m)[1] for m in _queued(broker, queue)]
    assert [m["job_id"] for m in messages].count(str(first)) == 2
    assert {m["idempotency_key"] for m in messages} == {"k-1", "k-2"}


def test_results_need_redis(service_settings) -> None:
    embedded = InferqClient(service_settings.model_copy(update={"broker_url": None}))
    with pytest.raises(ResultsUnavailable, match="redis://"):
        embedded.get(uuid.uuid4())


# -- reading back: a worker runs the jobs (null engine) ------------------------------------


@pytest.fixture
def null_worker(service_settings) -> Iterator:
    settings = service_settings.model_copy(update={"model": "null"})
    with running_worker(settings, {"null": NullEngine()}) as worker:
        yield worker


def test_a_client_sees_only_its_own_tenants_jobs(client: InferqClient, null_worker) -> None:
    tenant_a = client.for_tenant(f"a-{uuid.uuid4().hex[:8]}")
    tenant_b = client.for_tenant(f"b-{uuid.uuid4().hex[:8]}")
    job = tenant_a.submit("mine", params={"max_tokens": 2}, model="null")
    assert tenant_a.wait(job, timeout=30).status == "done"
    assert tenant_b.get(job) is None
    assert tenant_b.cancel(job) is False
    with pytest.raises(TimeoutError):
        tenant_b.wait(job, timeout=0.3)  # not even its existence shows
    view = tenant_a.get(job)
    assert (view.status, view.tenant, view.result.completion_tokens) == ("done", tenant_a.tenant, 2)
    assert tenant_a.cancel(job) is False  # done already


def test_cancel_before_any_worker_takes_it(client: InferqClient, service_settings) -> None:
    job_id = client.submit("cancel me", params={"max_tokens": 2}, model="null")
    assert client.cancel(job_id) is True  # recorded: no worker has it yet
    later = client.submit("run me", params={"max_tokens": 2}, model="null")
    settings = service_settings.model_copy(update={"model": "null"})
    with running_worker(settings, {"null": NullEngine()}) as worker:
        started = time.monotonic()
        view = client.wait(job_id, timeout=30)
        assert time.monotonic() - started < 5
        assert client.wait(later, timeout=30).status == "done"
    assert view.status == "cancelled" and view.finished_at is not None and view.result is None
    assert worker.repo.get(job_id).status == "cancelled"  # the record agrees
    assert client.cancel(job_id) is True  # cancelled it stays


def test_wait_times_out_on_a_job_nobody_runs(client: InferqClient) -> None:
    job_id = client.submit("nobody listens", params={"max_tokens": 2})
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="1 of 1"):
        client.wait(job_id, timeout=0.5, poll=0.05)
    assert 0.5 <= time.monotonic() - started < 3
    assert client.get(job_id) is None


def test_wait_many_times_out_on_an_unknown_job(client: InferqClient, null_worker) -> None:
    done = client.submit("x", params={"max_tokens": 2}, model="null")
    with pytest.raises(TimeoutError, match="1 of 2"):
        client.wait_many([done, uuid.uuid4()], timeout=2, poll=0.05)
    assert client.get(done).status == "done"
