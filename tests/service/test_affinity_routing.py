"""Prefix-affinity routing through Redis with two workers in this process (null engines):
jobs sharing a prefix meet on the worker that owns it, and a dead worker's queue is drained
by the others."""

from __future__ import annotations

import json
import time
import uuid
from contextlib import ExitStack

import pytest
import redis
from service_helpers import producer, running_worker, wait_for, workers_of

from api_client import InferqClient
from worker.broker import Peer, RedisSource, Router, prefix_key
from worker.broker.affinity import SLACK
from worker.broker.layout import affinity_queue, unrouted_key
from worker.engine.null import NullEngine

pytestmark = pytest.mark.services


def _settings(service_settings, name: str, dead_after_s: float = 3.0):
    return service_settings.model_copy(
        update={"model": "null", "worker_name": name, "affinity_dead_after_s": dead_after_s}
    )


def _wait_registered(settings, names: set[str], timeout: float = 10.0) -> None:
    client = redis.Redis.from_url(settings.broker_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = {
            k.decode(): json.loads(v)
            for k, v in client.hgetall(f"inferq:workers:{settings.queue}").items()
        }
        if names <= {n for n, e in entries.items() if time.time() - e["seen"] < 2}:
            time.sleep(1.2)  # every router has refreshed its view once more
            return
        time.sleep(0.1)
    raise AssertionError(f"workers not registered: {names}")


def test_jobs_sharing_a_prefix_meet_on_the_worker_that_owns_it(service_settings) -> None:
    """Fewer jobs a prefix than the load bound sheds at (an idle peer caps the owner at SLACK),
    and a dead-after long enough that a heartbeat late on a busy CPU is not a death."""
    names = ["aff-a", "aff-b"]
    router = Router()
    router.refresh({n: Peer(n, 0, frozenset({"null"})) for n in names})
    prefixes: dict[str, str] = {}  # owner -> a 128+ byte prefix it owns
    for i in range(50):
        text = f"system prompt {i}: " + "you are a careful assistant. " * 5
        owner = router.owner(prefix_key("default", "null", list(text.encode())), "null")
        prefixes.setdefault(owner, text)
        router.sent.clear()
    assert set(prefixes) == set(names)
    with ExitStack() as stack:
        services = [
            stack.enter_context(
                running_worker(_settings(service_settings, n, 10.0), {"null": NullEngine()})
            )
            for n in names
        ]
        _wait_registered(services[0].settings, set(names))
        client = InferqClient(_settings(service_settings, "client"))
        jobs = {
            owner: client.submit_many(
                {"prompt": f"{text} question {q}?", "params": {"max_tokens": 2}}
                for q in range(SLACK - 1)
            )
            for owner, text in prefixes.items()
        }
        ids = [j for group in jobs.values() for j in group]
        views = wait_for(services[0].repo, ids, timeout=60)
        ran_on = workers_of(services[0].repo, ids)
    assert all(v.status == "done" for v in views.values())
    for owner, group in jobs.items():
        assert [ran_on[j] for j in group] == [owner] * len(group)


def test_a_dead_workers_queue_is_drained_by_the_live_ones(service_settings) -> None:
    settings = _settings(service_settings, "aff-live")
    broker = redis.Redis.from_url(settings.broker_url)
    registry = f"inferq:workers:{settings.queue}"
    gone = {"seen": time.time() - 5, "held": 0, "models": ["null"]}
    broker.hset(registry, "aff-ghost", json.dumps(gone))
    stranded = uuid.uuid4()
    producer(settings).send_task(
        "inferq.generate",
        queue=affinity_queue(settings.queue, "aff-ghost"),
        kwargs={"job_id": str(stranded), "prompt": "waiting for a dead worker", "model": "null"},
    )
    started = time.monotonic()
    with running_worker(settings, {"null": NullEngine()}) as service:
        view = wait_for(service.repo, [stranded], timeout=30)[stranded]
        took = time.monotonic() - started
    assert view.status == "done" and view.worker == "aff-live"
    assert took < 10
    assert broker.llen(affinity_queue(settings.queue, "aff-ghost")) == 0


def test_messages_a_dead_worker_had_taken_come_back_within_seconds(service_settings) -> None:
    """A worker that took a message and died (no ack, no heartbeat): the live ones push the
    message back long before the visibility timeout, and it runs once."""
    settings = _settings(service_settings, "aff-live")
    job = uuid.uuid4()
    producer(settings).send_task(
        "inferq.generate",
        queue=settings.queue,
        kwargs={"job_id": str(job), "prompt": "taken by a worker that then died", "model": "null"},
    )
    ghost = RedisSource(_settings(service_settings, "aff-ghost"), "aff-ghost", ["null"])
    assert len(ghost.receive(10, 2.0)) == 1  # taken, never acknowledged
    ghost.close()  # its heartbeat stops: dead 3 s later (affinity_dead_after_s)
    started = time.monotonic()
    with running_worker(settings, {"null": NullEngine()}) as service:
        view = wait_for(service.repo, [job], timeout=30)[job]
        took = time.monotonic() - started
    assert view.status == "done" and view.worker == "aff-live" and view.attempts == 1
    assert took < 15  # the visibility timeout is 30 minutes


def test_a_take_being_routed_is_not_the_takers_load(service_settings) -> None:
    """Two idle workers woken by one burst both take from the shared queue; what a worker has
    taken and not routed yet (most of it may be handed on) must not make it look busy to the
    other, or a prefix it owns spills for a moment's bookkeeping."""
    a = RedisSource(_settings(service_settings, "load-a"), "load-a", ["null"])
    b = RedisSource(_settings(service_settings, "load-b"), "load-b", ["null"])
    try:
        send = producer(_settings(service_settings, "load-a")).send_task
        for i in range(8):
            send("inferq.generate", queue=a.queue, kwargs={"prompt": f"p{i}", "model": "null"})
        taken = a.receive(8, 2.0)
        assert len(taken) == 8
        assert b.registry is not None
        peers, _ = b.registry.peers()
        assert peers["load-a"].load == 0  # taken, being routed
        assert b.forward(taken[0], "load-b") is False  # not b's to hand
        assert a.forward(taken[0], "load-b") and a.forward(taken[1], "load-b")
        a.routed()  # kept the other six
        peers, _ = b.registry.peers()
        assert (peers["load-a"].load, peers["load-b"].load) == (6, 2)
    finally:
        a.close()
        b.close()


def test_without_affinity_a_take_keeps_no_routing_books(service_settings) -> None:
    """With affinity off nothing reads what is being routed: a take records none of it."""
    settings = _settings(service_settings, "solo").model_copy(update={"affinity": False})
    source = RedisSource(settings, "solo", ["null"])
    try:
        send = producer(settings).send_task
        for i in range(3):
            send("inferq.generate", queue=source.queue, kwargs={"prompt": f"p{i}", "model": "null"})
        assert len(source.receive(3, 2.0)) == 3
        assert source.registry is None
        assert not source.client.exists(unrouted_key(source.queue, "solo"))
    finally:
        source.close()
