"""Issue 25, findings 2, 6 and 11, on a real worker (null engine) over Redis and PostgreSQL:
no message loops forever, signed messages are fresh and may rotate keys, a replay is the same
job, unkeyed tenants can be shut out, and a keyed tenant's lost job is resent signed."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
import sqlalchemy as sa
from service_helpers import envelope as _envelope
from service_helpers import producer, records, running_worker, wait_for

from api_client import InferqClient
from api_client.signing import signed
from storage.models import jobs_table
from worker.service.app import WorkerService
from worker.service.intake import Intake

pytestmark = [pytest.mark.services]
KEY, OLD_KEY = "acme-key-0123456789abcdef", "acme-old-0123456789abcdef"


@pytest.fixture
def tenant() -> str:
    return f"acme-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def settings(service_settings, tenant: str):
    """A null-engine worker that knows `tenant`'s keys (new first, then old)."""
    return service_settings.model_copy(
        update={
            "engine": "null",
            "tenant_keys": f"{tenant}={KEY},{tenant}={OLD_KEY}",
            "visibility_timeout_s": 2,
            "heartbeat_s": 0.5,
        }
    )


def _job(tenant: str, job_id: uuid.UUID | None = None, **extra: object) -> dict:
    kwargs = {"tenant": tenant, "prompt": "Hi", "params": {"max_tokens": 2}, **extra}
    if job_id is not None:
        kwargs["job_id"] = str(job_id)
    return {"submitted_at": datetime.now(UTC).isoformat(), **kwargs}


def _body(kwargs: dict) -> str:
    return json.dumps([[], kwargs, {}])


def _letters(worker: WorkerService, since: datetime, count: int, wait_s: float = 20) -> list:
    deadline = time.monotonic() + wait_s
    while True:
        letters = [d for d in worker.repo.dead_letters(500) if d["received_at"] >= since]
        if len(letters) >= count or time.monotonic() > deadline:
            return letters
        time.sleep(0.1)


def _none_unacked(r: redis.Redis, wait_s: float = 10) -> bool:
    """Whether every taken message is acknowledged (acks follow the commit by a poll)."""
    deadline = time.monotonic() + wait_s
    while r.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    return r.hlen("unacked") == 0


def test_one_message_never_loops_forever(settings, tenant: str) -> None:
    """A body nested deeper than the recursion limit, a non-ASCII signature for a keyed tenant
    and a body that is a number each end as one dead letter, acknowledged; the normal job of
    their take runs."""
    q, r = settings.queue, redis.Redis.from_url(settings.broker_url)
    normal, forged = uuid.uuid4(), uuid.uuid4()
    bad_signature = {**_job(tenant, forged), "signature": "é" * 64}
    for body in ("[" * 5000, _body(bad_signature), _body(_job("default", normal))):
        r.lpush(q, _envelope(q, body))  # one take: all before the worker starts
    r.lpush(q, json.dumps({**json.loads(_envelope(q, "")), "body": 10**9}))  # not even text
    started = datetime.now(UTC)
    with running_worker(settings, {}) as worker:
        assert wait_for(worker.repo, [normal], timeout=30)[normal].status == "done"
        letters = _letters(worker, started, 3)
        time.sleep(2 * settings.visibility_timeout_s)  # a message left unacked would be back
        assert len(_letters(worker, started, 4, wait_s=0)) == 3
        assert worker.alive() and r.llen(q) == 0 and _none_unacked(r)
    reasons = {d["reason"]: d for d in letters}
    assert sorted(d["reason"] for d in letters) == [
        "invalid job message",
        "non-JSON message refused",
        "undecodable message",
    ]
    assert "RecursionError" in reasons["undecodable message"]["error"]
    assert reasons["invalid job message"]["job_id"] == forged
    assert "signature" in reasons["invalid job message"]["error"]


def test_handler_error_refuses_only_its_message(settings, monkeypatch) -> None:
    """An error handling one message (here: preparing it) is that message's dead letter; the
    other messages of its take run."""
    prepare = Intake._prepare

    def _fragile(self, message, job):
        if job.prompt == "boom":
            raise RuntimeError("a bug met this message")
        return prepare(self, message, job)

    monkeypatch.setattr(Intake, "_prepare", _fragile)
    q, r = settings.queue, redis.Redis.from_url(settings.broker_url)
    before, boom, after = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for job_id, prompt in ((before, "Hi"), (boom, "boom"), (after, "Hi")):
        r.lpush(q, _envelope(q, _body({**_job("default", job_id), "prompt": prompt})))
    started = datetime.now(UTC)
    with running_worker(settings, {}) as worker:
        views = wait_for(worker.repo, [before, after], timeout=30)
        letters = _letters(worker, started, 1)
        assert _none_unacked(r)
    assert all(v.status == "done" and v.attempts == 1 for v in views.values())
    assert [(d["reason"], d["job_id"]) for d in letters] == [("message handling failed", boom)]


def test_stale_signature_and_key_rotation(settings, tenant: str) -> None:
    """Finding 11 (a, d): a signed message sent more than 5 minutes ago (or never saying when)
    is refused as stale; the tenant's old and new keys both verify during a rotation."""
    app = producer(settings)
    ok_new, ok_old, stale, undated = (uuid.uuid4() for _ in range(4))
    old = (datetime.now(UTC) - timedelta(minutes=6)).isoformat()
    sends = [
        signed(_job(tenant, ok_new), KEY),
        signed(_job(tenant, ok_old), OLD_KEY),
        signed(_job(tenant, stale, submitted_at=old), KEY),
        signed({k: v for k, v in _job(tenant, undated).items() if k != "submitted_at"}, KEY),
    ]
    started = datetime.now(UTC)
    with running_worker(settings, {}) as worker:
        for kwargs in sends:
            app.send_task("inferq.generate", queue=settings.queue, kwargs=kwargs)
        views = wait_for(worker.repo, [ok_new, ok_old], timeout=30)
        letters = _letters(worker, started, 2)
    assert all(v.status == "done" for v in views.values())
    assert sorted((d["reason"], d["job_id"]) for d in letters) == sorted(
        [("stale signature", stale), ("stale signature", undated)]
    )


def test_message_without_job_id_is_its_celery_task_id(settings, tenant: str) -> None:
    """Finding 11 (b): a message without `job_id`, sent twice with the same task id (a replay),
    is one job whose id is the task id (a signed message must name its job_id itself)."""
    task_id, tenant = uuid.uuid4(), f"open-{tenant}"  # a tenant without a key
    kwargs = _job(tenant)
    app = producer(settings)
    with running_worker(settings, {}) as worker:
        for _ in range(2):
            app.send_task(
                "inferq.generate", queue=settings.queue, kwargs=kwargs, task_id=str(task_id)
            )
        view = wait_for(worker.repo, [task_id], timeout=30)[task_id]
        time.sleep(1)
        with worker.repo.engine.connect() as conn:
            ids = conn.scalars(sa.select(jobs_table.c.id).where(jobs_table.c.tenant == tenant))
            assert list(ids) == [task_id]
    assert view.status == "done" and view.attempts == 1


def test_short_signing_key_stops_the_worker(settings, tenant: str) -> None:
    """Finding 11 (c): an empty or short key is refused at start, never taken as 'unsigned'."""
    for keys in (f"{tenant}=", f"{tenant}=short"):
        with pytest.raises(ValueError, match="at least 16"):
            WorkerService(settings.model_copy(update={"tenant_keys": keys}))


def test_require_signature_refuses_unkeyed_tenants(settings, tenant: str) -> None:
    """Finding 11 (e): with require_signature, a tenant without a key cannot be claimed."""
    strict = settings.model_copy(update={"require_signature": True})
    unkeyed, keyed = uuid.uuid4(), uuid.uuid4()
    app = producer(strict)
    started = datetime.now(UTC)
    with running_worker(strict, {}) as worker:
        app.send_task("inferq.generate", queue=strict.queue, kwargs=_job("mallory", unkeyed))
        app.send_task(
            "inferq.generate", queue=strict.queue, kwargs=signed(_job(tenant, keyed), KEY)
        )
        assert wait_for(worker.repo, [keyed], timeout=30)[keyed].status == "done"
        letters = _letters(worker, started, 1)
    assert [(d["reason"], d["job_id"]) for d in letters] == [("unsigned tenant", unkeyed)]
    assert worker.repo.get(unkeyed) is None


def test_sweeper_resends_a_keyed_tenants_job_signed(settings, tenant: str) -> None:
    """Finding 6 (the resend half): a keyed tenant's job whose message was lost is sent again
    signed with the tenant's first key, fresh, with its deadline kept: it runs."""
    quick = settings.model_copy(update={"requeue_after_s": 1.0})
    client = InferqClient(quick, tenant=tenant, key=KEY)
    lost = client.build("Hi", params={"max_tokens": 2}, ttl_s=3600)
    queued = datetime.now(UTC) - timedelta(minutes=10)  # a resend as sent then would be stale
    expires = queued + timedelta(hours=1)
    job = dataclasses.replace(lost.to_job(quick.model), queued_at=queued, expires_at=expires)
    job_id, _ = records(quick).submit(job)  # recorded, but its message never sent
    started = datetime.now(UTC)
    with running_worker(quick, {}) as worker:
        view = wait_for(worker.repo, [job_id], timeout=30)[job_id]
        letters = _letters(worker, started, 1, wait_s=0)
    assert view.status == "done", (view.status, view.error, [d["reason"] for d in letters])
    assert abs((view.expires_at - expires).total_seconds()) < 1
