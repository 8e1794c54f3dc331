"""kombu's Redis layout, as the broker's Lua scripts reuse it, checked against kombu itself
(the reason kombu is pinned): its constants, and round trips between kombu and our scripts.
A job Celery publishes is taken, read, acknowledged and pushed back by our scripts as kombu
would; what our scripts took, kombu can restore; what they push back, a plain kombu consumer
consumes in priority order.

Once per supported kombu version (`worker.broker.SUPPORTED_KOMBU`, which kombu's pin in
pyproject.toml must name): a version not installed here is skipped (install it to check it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import kombu
import pytest
import redis
from kombu import Connection, Consumer

from api_client import AsyncInferqClient, InferqClient
from api_client.kombu_push import bindings as kombu_bindings
from api_client.schema import JobMessage
from api_client.signing import signed
from api_client.wire import (
    PRIORITY_STEPS,
    TASK_NAME,
    broker_options,
    celery_priority,
    job_queue,
    producer_app,
    send_job,
)
from inferq.settings import get_settings
from worker.broker import SUPPORTED_KOMBU, RedisSource, queue_key
from worker.broker.layout import BOOKKEEPING, OWNERS, SEP, UNACKED, UNACKED_INDEX
from worker.service.messages import Trust, read_job

pytestmark = pytest.mark.services
KEY = "kombu-layout-test-key"


@pytest.fixture(params=SUPPORTED_KOMBU)
def kombu_version(request: pytest.FixtureRequest) -> str:
    if request.param != kombu.__version__:
        pytest.skip(f"kombu {request.param} is not installed here (kombu {kombu.__version__} is)")
    return request.param


@pytest.fixture
def settings(tmp_path: Path, redis_url: str):
    return get_settings(
        home=tmp_path / "home",
        broker_url=redis_url,
        affinity=False,
        queue=f"inferq-kombu-{uuid.uuid4().hex[:8]}",
    )


@contextmanager
def _kombu(settings) -> Iterator[Connection]:
    """A plain kombu connection, configured as Celery's producers and consumers are."""
    with Connection(settings.broker_url, transport_options=broker_options(settings)) as conn:
        yield conn


@contextmanager
def _consumed(settings, n: int) -> Iterator[list[kombu.Message]]:
    """The first `n` messages a plain kombu consumer takes, its connection open meanwhile."""
    got: list[kombu.Message] = []
    with _kombu(settings) as conn:
        with Consumer(
            conn.default_channel,
            queues=[job_queue(settings)],
            accept=["json"],
            on_message=got.append,
        ):
            while len(got) < n:
                conn.drain_events(timeout=5)
        yield got


def _send(settings, priority: int = 0) -> JobMessage:
    """One job published by Celery (our client's way: `send_job`, signed)."""
    job = JobMessage(
        prompt=f"kombu layout at priority {priority}",
        tenant="acme",
        priority=priority,
        submitted_at=datetime.now(UTC),
    )
    send_job(producer_app(settings), settings.queue, job, KEY)
    return job


def _items(r: redis.Redis, key: str) -> list[dict]:
    return [json.loads(item) for item in r.lrange(key, 0, -1)]


def test_the_pinned_and_installed_kombu_are_supported() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    worker = pyproject["project"]["optional-dependencies"]["worker"]  # producers: a 5.x range
    [pin] = [d for d in worker if d.startswith("kombu")]
    assert pin.startswith("kombu==") and pin.removeprefix("kombu==") in SUPPORTED_KOMBU
    assert kombu.__version__ in SUPPORTED_KOMBU


def test_kombus_redis_constants_are_the_layouts(kombu_version: str, settings) -> None:
    """The separator, the unacked keys, the priority steps and the list a message of each
    priority goes to (and is restored to) are kombu's, with our transport options."""
    with _kombu(settings) as conn:
        channel = conn.default_channel
        assert (channel.sep, channel.unacked_key, channel.unacked_index_key) == (
            SEP,
            UNACKED,
            UNACKED_INDEX,
        )
        assert list(channel.priority_steps) == PRIORITY_STEPS
        assert channel.visibility_timeout == settings.visibility_timeout_s
        q = settings.queue
        for priority in (None, -3, *range(12), "4"):
            props = {} if priority is None else {"priority": priority}
            kombus = channel._q_for_pri(q, channel._get_message_priority({"properties": props}))
            assert queue_key(q, int(props.get("priority") or 0)) == kombus, priority


def test_a_celery_job_is_taken_read_and_acknowledged_as_kombu_does(
    kombu_version: str, settings
) -> None:
    """Our TAKE records a message in kombu's unacked hash and index exactly as kombu's own
    consumer does (`[envelope, exchange, routing key]`), the envelope reads as the signed job
    Celery sent, and our ACK forgets only that message."""
    r = redis.Redis.from_url(settings.broker_url)
    q = queue_key(settings.queue, celery_priority(0))
    kombus_job = _send(settings)
    [kombus_item] = _items(r, q)
    with _kombu(settings) as conn:
        got = []
        with Consumer(
            conn.default_channel,
            queues=[job_queue(settings)],
            accept=["json"],
            on_message=got.append,
        ):
            conn.drain_events(timeout=5)
        [kombus_message] = got
        ours_job = _send(settings)
        [ours_item] = _items(r, q)
        source = RedisSource(settings)
        try:
            [taken] = source.receive(1, 5.0)
            entries = {tag.decode(): json.loads(e) for tag, e in r.hgetall(UNACKED).items()}
            tags = {kombus_message.delivery_tag: kombus_item, taken.handle: ours_item}
            for tag, item in tags.items():
                info = item["properties"]["delivery_info"]
                assert entries[tag] == [item, info["exchange"], info["routing_key"]]
                assert r.zscore(UNACKED_INDEX, tag) is not None
            assert taken.handle == ours_item["properties"]["delivery_tag"]
            job = read_job(taken, Trust(keys={"acme": (KEY,)}), datetime.now(UTC))
            assert job == ours_job.model_copy(update={"signature": job.signature})
            assert kombus_message.decode()[1] == signed(kombus_job.to_wire(), KEY)
            source.ack([taken.handle])
            assert set(r.hkeys(UNACKED)) == {kombus_message.delivery_tag.encode()}
            kombus_message.ack()
        finally:
            source.close()
    assert all(r.exists(key) == 0 for key in BOOKKEEPING) and r.llen(q) == 0


def test_kombu_restores_what_our_scripts_took_as_our_scripts_do(
    kombu_version: str, settings
) -> None:
    """A message our TAKE holds, restored by kombu's own QoS (as a kombu consumer sharing the
    broker may), goes back to the same list, to the same end (taken next), as the same item,
    as when we push it back."""
    r = redis.Redis.from_url(settings.broker_url)
    _send(settings, priority=9)
    urgent = queue_key(settings.queue, celery_priority(9))
    [first] = r.lrange(urgent, 0, -1)
    source = RedisSource(settings)
    try:
        with _kombu(settings) as conn:
            [taken] = source.receive(1, 5.0)
            _send(settings, priority=9)  # waits behind it
            conn.default_channel.qos.restore_by_tag(taken.handle)
        waiting, kombus = _items(r, urgent)
        assert kombus["headers"]["redelivered"] is True
        assert kombus["properties"]["delivery_tag"] == taken.handle
        r.delete(urgent)
        r.lpush(urgent, first, json.dumps(waiting))  # as before kombu restored it
        [taken] = source.receive(1, 5.0)
        source.requeue([taken.handle])
        assert _items(r, urgent) == [waiting, kombus]
        assert all(r.exists(key) == 0 for key in BOOKKEEPING if key != OWNERS)
        assert r.hkeys(OWNERS) in ([], [b""])
    finally:
        source.close()


def test_a_plain_kombu_consumer_consumes_what_we_pushed_back(kombu_version: str, settings) -> None:
    """Jobs our scripts took and pushed back are consumed by a kombu consumer, the urgent one
    first, as redelivered, with Celery's body and headers; its acks leave nothing behind."""
    r = redis.Redis.from_url(settings.broker_url)
    low, urgent = _send(settings, priority=0), _send(settings, priority=9)
    source = RedisSource(settings)
    try:
        taken = source.receive(2, 5.0)
        assert len(taken) == 2
        source.requeue([m.handle for m in taken])
    finally:
        source.close()
    with _consumed(settings, 2) as got:
        assert [m.headers["id"] for m in got] == [str(urgent.job_id), str(low.job_id)]
        for message, job in zip(got, (urgent, low), strict=True):
            assert message.headers["task"] == TASK_NAME and message.delivery_info["redelivered"]
            assert message.decode()[1] == signed(job.to_wire(), KEY)
            assert message.properties["priority"] == celery_priority(job.priority)
            message.ack()
    assert all(r.exists(key) == 0 for key in BOOKKEEPING if key != OWNERS)
    assert sum(r.llen(queue_key(settings.queue, p)) for p in PRIORITY_STEPS) == 0


def test_our_push_is_celerys_message_item_by_item(kombu_version: str, settings) -> None:
    """`AsyncInferqClient.send` on Redis pushes, in one round trip, the item Celery's
    producer writes for the same job (all but the delivery tag and the producer's reply_to
    name, which are per message and per producer), onto the same list, with the queue's
    bindings; a plain kombu consumer and our source both read it as the signed job."""
    r = redis.Redis.from_url(settings.broker_url)
    job = JobMessage(
        prompt="pushed",
        tenant="acme",
        priority=7,
        idempotency_key="k",
        submitted_at=datetime.now(UTC),
    )
    send_job(producer_app(settings), settings.queue, job, KEY)
    q = queue_key(settings.queue, celery_priority(7))
    [celerys] = _items(r, q)
    celery_bindings = {k: r.smembers(k) for k in r.keys(f"_kombu.binding*.{settings.queue}")}
    r.delete(q, *celery_bindings)

    async def push() -> None:
        client = AsyncInferqClient(settings, "acme", KEY)
        try:
            await client.send(job)
        finally:
            await client.aclose()

    asyncio.run(push())
    [ours] = _items(r, q)
    assert {
        k: r.smembers(k) for k in r.keys(f"_kombu.binding*.{settings.queue}")
    } == celery_bindings
    for item in (celerys, ours):
        del item["properties"]["delivery_tag"], item["properties"]["reply_to"]
    assert ours == celerys
    assert base64.b64decode(ours["body"]) == base64.b64decode(celerys["body"])

    with _kombu(settings) as conn:
        got = []
        with Consumer(
            conn.default_channel,
            queues=[job_queue(settings)],
            accept=["json"],
            on_message=got.append,
        ):
            conn.drain_events(timeout=5)
        [message] = got
        assert message.headers["id"] == str(job.job_id) and message.headers["task"] == TASK_NAME
        assert message.decode()[1] == signed(job.to_wire(), KEY)
        message.requeue()  # back for our source
    source = RedisSource(settings)
    try:
        [taken] = source.receive(1, 5.0)
        read = read_job(taken, Trust(keys={"acme": (KEY,)}), datetime.now(UTC))
        assert read == job.model_copy(update={"signature": read.signature})
        source.ack([taken.handle])
    finally:
        source.close()


@pytest.mark.parametrize("client_kind", ["sync", "asyncio"])
def test_submit_many_pushes_one_lpush_per_list_in_order(
    kombu_version: str, settings, client_kind: str
) -> None:
    """Both clients' `submit_many` on Redis push a batch as one LPUSH per priority list (a
    worker takes the batch whole, not its first few), and a plain kombu consumer takes the
    jobs urgent first, each list in the order submitted."""
    r = redis.Redis.from_url(settings.broker_url)
    jobs = [{"prompt": f"job {i}", "priority": 9 if i % 2 else 0} for i in range(5)]
    lpushes = lambda: r.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)  # noqa: E731
    before = lpushes()
    if client_kind == "sync":
        client = InferqClient(settings, "acme", KEY)
        try:
            ids = client.submit_many(jobs)
        finally:
            client.close()
    else:

        async def submit() -> list[uuid.UUID]:
            client = AsyncInferqClient(settings, "acme", KEY)
            try:
                return await client.submit_many(jobs)
            finally:
                await client.aclose()

        ids = asyncio.run(submit())
    assert lpushes() - before == 2  # the urgent list and the normal one
    assert r.sismember(*kombu_bindings(settings.queue)[0])
    with _consumed(settings, len(jobs)) as got:
        for message in got:
            message.ack()
    assert [m.headers["id"] for m in got] == [str(ids[i]) for i in (1, 3, 0, 2, 4)]
    assert [m.decode()[1]["prompt"] for m in got] == [f"job {i}" for i in (1, 3, 0, 2, 4)]
