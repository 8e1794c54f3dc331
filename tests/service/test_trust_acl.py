"""The producer's Redis role (docs/security.md): a plain Celery producer whose Redis user
may only push to the queue (an ACL user with the commands docs/security.md lists) enqueues jobs a
worker serves, and cannot read, take or drop what waits in the queue or what a worker holds."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from service_helpers import running_worker, wait_for

from api_client.wire import broker_options
from worker.broker.layout import held_key

pytestmark = pytest.mark.services

# The producer's ACL, as docs/security.md gives it.
PRODUCER_COMMANDS = ("+lpush", "+sadd", "+llen", "+ping", "+select", "+multi", "+exec")


@pytest.fixture
def producer_user(default_queue) -> Iterator[str]:
    """A Redis ACL user that may only push to the queue; its broker URL."""
    service_settings = default_queue
    admin = redis.Redis.from_url(service_settings.broker_url)
    name, password = f"producer-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    q = service_settings.queue
    rules = ["reset", "on", f">{password}", f"~{q}", f"~{q}[^:]*", "~_kombu.binding*"]
    admin.execute_command("ACL", "SETUSER", name, *rules, "-@all", *PRODUCER_COMMANDS)
    try:
        yield service_settings.broker_url.replace("redis://", f"redis://{name}:{password}@", 1)
    finally:
        admin.acl_deluser(name)


@pytest.fixture
def default_queue(service_settings):
    """The settings on the default queue name, whose prefix the worker's own keys share
    (`inferq:held:inferq:<worker>`, ...): the producer's key patterns must leave those out."""
    return service_settings.model_copy(update={"engine": "null", "queue": "inferq"})


def test_push_only_producer_enqueues_and_cannot_read_the_queue(
    default_queue, producer_user: str
) -> None:
    settings, q = default_queue, default_queue.queue
    app = Celery("backend", broker=producer_user, set_as_current=False)
    app.conf.update(task_serializer="json", broker_transport_options=broker_options(settings))
    ids = [uuid.uuid4(), uuid.uuid4()]
    for priority, job_id in enumerate(ids):
        kwargs = {"job_id": str(job_id), "prompt": "Hi", "params": {"max_tokens": 2}}
        app.send_task("inferq.generate", kwargs=kwargs, queue=q, priority=priority)
    mine = redis.Redis.from_url(producer_user)
    assert mine.llen(q) == 1  # it may see how long the queue is, and no more
    for read in (
        lambda: mine.lrange(q, 0, -1),
        lambda: mine.rpop(q),
        lambda: mine.delete(q),
        lambda: mine.hgetall("unacked"),
        lambda: mine.keys("*"),
        lambda: mine.sadd(held_key(q, "some-worker"), "a-tag"),  # the worker's own keys
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            read()
    with running_worker(settings, {}) as worker:
        views = wait_for(worker.repo, ids, timeout=30)
    assert all(v.status == "done" for v in views.values())
