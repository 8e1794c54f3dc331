"""Results, cancels and revokes treated as hostile input (docs/security.md): a revoke or a
cancel request for another tenant's job changes nothing, no message writes another job's
result, and a producer with the documented Redis role reads results and cannot forge them.
Workers in this process (null engines) on the real Redis and PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from service_helpers import GatedEngine, producer, running_worker, wait_for, wait_status

from api_client import InferqClient
from api_client.results import CANCEL_CHANNEL, cancel_key, pidbox_channel, result_key
from worker.engine.null import NullEngine

pytestmark = pytest.mark.services
KEY = "alice-signing-key-0123456789"
TASK = "inferq.generate"


@pytest.fixture
def settings(service_settings):
    return service_settings.model_copy(
        update={
            "model": "null",
            "tenant_keys": f"alice={KEY}",
            "cancel_poll_s": 0.3,
            "result_poll_s": 0.3,
            "affinity": False,
        }
    )


def test_cancels_and_revokes_of_another_tenants_job_change_nothing(settings) -> None:
    alice = InferqClient(settings, tenant="alice", key=KEY)
    bob = InferqClient(settings, tenant="bob")
    r = redis.Redis.from_url(settings.broker_url)
    gated = GatedEngine()
    with running_worker(settings, {"null": gated}) as worker:
        job = alice.submit("Alice's job", params={"max_tokens": 2})
        bobs = bob.submit("Bob's job", params={"max_tokens": 2})
        wait_status(alice, job, "running")
        wait_status(bob, bobs, "running")
        # a plain Celery revoke: alice has a signing key, a revoke names no tenant
        Celery(broker=settings.broker_url, set_as_current=False).control.revoke(str(job))
        assert InferqClient(settings, tenant="mallory").cancel(job) is False  # not hers
        forged = [
            {"job_id": str(job), "tenant": "alice"},  # unsigned
            {"job_id": str(job), "tenant": "alice", "signature": "0" * 64},  # forged
            {"job_id": str(job), "tenant": "mallory"},  # another tenant
            {"job_id": str(uuid.uuid4()), "tenant": "alice"},  # about another job
        ]
        for body in forged:
            r.sadd(cancel_key(job), json.dumps(body))
        r.sadd(cancel_key(job), "not json", "[" * 10_000, "x" * 100_000)
        for notice in (str(job), "not a job id", "x" * 100_000, json.dumps({"job_id": str(job)})):
            r.publish(CANCEL_CHANNEL, notice)
        r.publish(pidbox_channel(r.connection_pool.connection_kwargs.get("db", 0)), "[" * 50_000)
        time.sleep(1.0)  # several notifications handled, several re-reads of the requests
        assert alice.get(job).status == "running"
        assert worker.repo.get(job).status == "running"
        assert job in worker.ledger and worker.alive()
        # bob's tenant has no key: a revoke (naming only the job) cancels it, like Celery's
        Celery(broker=settings.broker_url, set_as_current=False).control.revoke(str(bobs))
        assert bob.wait(bobs, timeout=10).status == "cancelled"
        assert alice.cancel(job) is True  # the tenant itself, signed
        assert alice.wait(job, timeout=10).status == "cancelled"
        gated.gate.set()
        after = alice.submit("Still serving?", params={"max_tokens": 2})
        assert alice.wait(after, timeout=30).status == "done"


def test_no_message_writes_another_jobs_result(settings) -> None:
    """A Celery task id naming alice's job (with another job id in the kwargs, or none),
    a message with her job id and other content: her result key is not touched."""
    alice = InferqClient(settings, tenant="bob")  # unsigned: anyone may speak for it
    r = redis.Redis.from_url(settings.broker_url)
    app = producer(settings)
    with running_worker(settings, {"null": NullEngine()}) as worker:
        job = alice.submit("Bob's job", params={"max_tokens": 2})
        assert alice.wait(job, timeout=30).status == "done"
        before = r.get(result_key(job))
        own = uuid.uuid4()
        kwargs = {"tenant": "mallory", "prompt": "Mallory's", "params": {"max_tokens": 3}}
        app.send_task(
            TASK, queue=settings.queue, task_id=str(job), kwargs={**kwargs, "job_id": str(own)}
        )
        app.send_task(TASK, queue=settings.queue, task_id=str(job), kwargs=kwargs)
        app.send_task(TASK, queue=settings.queue, kwargs={**kwargs, "job_id": str(job)})
        app.send_task(
            TASK,
            queue=settings.queue,  # bob's name, other content
            kwargs={**kwargs, "tenant": "bob", "job_id": str(job)},
        )
        mine = wait_for(worker.repo, [own], timeout=30)[own]
        time.sleep(1.0)  # the rest are refused ("job id taken")
        letters = [d for d in worker.repo.dead_letters(100) if d["job_id"] == job]
    assert r.get(result_key(job)) == before
    assert mine.tenant == "mallory" and alice.for_tenant("mallory").get(own).status == "done"
    assert sorted(d["reason"] for d in letters) == ["job id taken"] * 3


# -- the producer's Redis role -----------------------------------------------------------------


def producer_acl(queue: str, db: int) -> list[str]:
    """The rules docs/security.md gives a producer that reads results (InferqClient, or
    Celery with `backend=`): push to the queue, read results and streams, subscribe to
    results, add cancel requests, publish cancel notices and Celery's revokes."""
    return [
        f"~{queue}",
        f"~{queue}[^:]*",
        "~_kombu.binding*",
        "~inferq:cancel:*",
        "%R~celery-task-meta-*",
        "%R~inferq:stream:*",
        "&celery-task-meta-*",
        "-@all",
        "+lpush",
        "+sadd",
        "+llen",
        "+ping",
        "+select",
        "+multi",
        "+exec",
        "+get",
        "+mget",
        "+xread",
        "+subscribe",
        "+unsubscribe",
        "+client|setname",
        f"(+publish &{CANCEL_CHANNEL} &{pidbox_channel(db)})",
    ]


@pytest.fixture
def producer_url(settings) -> Iterator[str]:
    admin = redis.Redis.from_url(settings.broker_url)
    db = admin.connection_pool.connection_kwargs.get("db", 0)
    name, password = f"producer-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rules = ["reset", "on", f">{password}", *producer_acl(settings.queue, db)]
    admin.execute_command("ACL", "SETUSER", name, *rules)
    try:
        yield settings.broker_url.replace("redis://", f"redis://{name}:{password}@", 1)
    finally:
        admin.acl_deluser(name)


def test_a_producer_with_the_documented_role_reads_results_and_cannot_forge_them(
    settings, producer_url: str
) -> None:
    mine = settings.model_copy(update={"broker_url": producer_url, "tenant_keys": ""})
    client = InferqClient(mine, tenant="acme")
    app = Celery("backend", broker=producer_url, backend=producer_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    gated = GatedEngine()
    with running_worker(settings, {"null": gated}):
        job = client.submit("Hi", params={"max_tokens": 2})
        wait_status(client, job, "running")
        sent = app.send_task(TASK, queue=settings.queue, kwargs={"prompt": "Hi", "model": "null"})
        held = client.submit("Cancel me", params={"max_tokens": 2})
        wait_status(client, held, "running")
        assert client.cancel(held) is True
        revoked = app.send_task(TASK, queue=settings.queue, kwargs={"prompt": "Hi again"})
        wait_status(client.for_tenant("default"), uuid.UUID(revoked.id), "running")
        app.control.revoke(revoked.id)  # a broadcast, read asynchronously: wait for its effect
        wait_status(client.for_tenant("default"), uuid.UUID(revoked.id), "cancelled")
        gated.gate.set()
        assert client.wait(job, timeout=30).status == "done"
        assert "".join(client.stream(job, timeout=10)) == ""  # the null engine's text
        assert sent.get(timeout=30)["status"] == "done"
        with pytest.raises(TaskRevokedError):
            revoked.get(timeout=30)
        assert client.wait(held, timeout=10).status == "cancelled"
    r = redis.Redis.from_url(producer_url)
    key = result_key(job)
    for forge in (
        lambda: r.set(key, b"{}"),
        lambda: r.set(result_key(uuid.uuid4()), b"{}"),
        lambda: r.delete(key),
        lambda: r.expire(key, 1),
        lambda: r.publish(key, b"{}"),
        lambda: r.xadd(f"inferq:stream:{job}", {"d": "forged"}),
        lambda: r.srem(cancel_key(held), "x"),
        lambda: r.delete(cancel_key(held)),
        lambda: r.publish("inferq:anything", "x"),
        lambda: r.keys("*"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forge()
