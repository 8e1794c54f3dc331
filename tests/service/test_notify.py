"""The clients' shared subscription (`api_client/notify.py`) on the real Redis: one connection
for all of a client's waits, no wake-up lost between a wait's subscription and a result, a
result written before the wait found, and waits that carry on after the connection is lost.

The re-read fallback is set to a minute: within these tests a wait ends by a notification
(or by its first read), never by a poll.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis

from api_client import AsyncInferqClient, InferqClient
from api_client.notify import NAME, READ_S
from api_client.results import encode, result_key, to_meta
from inferq.settings import get_settings
from storage.records import JobView, ResultRow

pytestmark = pytest.mark.services
TENANT = "notify"
NO_POLL_S = 60.0


def _done(job_id: uuid.UUID) -> bytes:
    now = datetime.now(UTC)
    view = JobView(job_id, TENANT, "m", "done", 0, 1, None, now, now, now, "w", None)
    view.result = ResultRow(job_id, f"text of {job_id}", "stop", 1, 1, 0)
    meta = to_meta(view)
    assert meta is not None
    return encode(meta)


def _finish(
    r: redis.Redis, job_ids: list[uuid.UUID], kill: list[int] = (), bare: bool = False
) -> None:
    """What a worker writes for ended jobs: SET, then PUBLISH the same value on the key's
    channel (`bare`: an empty notification); after closing the connections `kill` in the same
    transaction, when given (nobody hears it)."""
    pipe = r.pipeline(transaction=bool(kill))
    for conn_id in kill:
        pipe.client_kill_filter(_id=conn_id)
    for job_id in job_ids:
        value = _done(job_id)
        pipe.set(result_key(job_id), value, px=60_000)
        pipe.publish(result_key(job_id), b"" if bare else value)
    pipe.execute()


def _notify_connections(r: redis.Redis) -> list[dict]:
    """The shared subscriptions' connections on this test's Redis database that subscribe to
    something (other sessions may share the Redis server)."""
    db = str(r.connection_pool.connection_kwargs.get("db", 0))
    return [
        c
        for c in r.client_list()
        if c.get("name") == NAME and int(c.get("sub", 0)) > 0 and str(c.get("db")) == db
    ]


@pytest.fixture
def settings(tmp_path, redis_url):
    return get_settings(home=tmp_path, broker_url=redis_url, result_poll_s=NO_POLL_S, tenant=TENANT)


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, max_connections=1000)
    yield client
    client.close()


@pytest.mark.parametrize("bare", [False, True], ids=["payload", "bare"])
def test_no_wake_up_is_lost_after_a_watch_returns(settings, r, bare) -> None:
    """A watch returns once Redis has the subscription: a result published right after it
    wakes the call (a watch that returned before would lose some of these), with the value the
    notification carries or, for a bare notification, the key's."""
    client = InferqClient(settings)
    hub, ids = client.subscriptions, [uuid.uuid4() for _ in range(200)]
    heard: dict[uuid.UUID, bytes | str | None] = {}

    def one(job_id: uuid.UUID) -> None:
        watch = hub.watch([result_key(job_id)], confirm_s=10)
        _finish(r, [job_id], bare=bare)
        deadline = time.monotonic() + 10
        while job_id not in heard and time.monotonic() < deadline:
            heard.update(hub.wait(watch, deadline - time.monotonic()))
        hub.unwatch(watch)

    threads = [threading.Thread(target=one, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    client.close()
    assert sorted(heard) == sorted(ids)
    assert all(heard[i] == r.get(result_key(i)) for i in ids)  # the key's value


def test_a_notification_carries_its_value(settings, r) -> None:
    """A waiting call takes the value a notification carries, without reading the key (the
    worker SETs and PUBLISHes the same value in one step): here the key is never written."""
    client = InferqClient(settings)
    hub, job_id = client.subscriptions, uuid.uuid4()
    watch = hub.watch([result_key(job_id)], confirm_s=10)
    value = _done(job_id)
    r.publish(result_key(job_id), value)
    heard: dict[uuid.UUID, bytes | str | None] = {}
    deadline = time.monotonic() + 10
    while not heard and time.monotonic() < deadline:
        heard.update(hub.wait(watch, deadline - time.monotonic()))
    hub.unwatch(watch)
    client.close()
    assert heard == {job_id: value}
    assert r.get(result_key(job_id)) is None


def test_async_no_wake_up_is_lost_after_a_watch_returns(settings, redis_url) -> None:
    async def main() -> dict[uuid.UUID, bool]:
        client = AsyncInferqClient(settings)
        r = redis.asyncio.Redis.from_url(redis_url, max_connections=1000)
        hub, got = client.subscriptions, {}

        async def one(job_id: uuid.UUID) -> None:
            watch = await hub.watch([result_key(job_id)], confirm_s=10)
            await r.publish(result_key(job_id), b"")
            deadline = time.monotonic() + 10
            while job_id not in got and time.monotonic() < deadline:
                got.update(await hub.wait(watch, deadline - time.monotonic()))
            await hub.unwatch(watch)

        try:
            await asyncio.gather(*(one(uuid.uuid4()) for _ in range(200)))
        finally:
            await r.aclose()
            await client.aclose()
        return got

    assert len(asyncio.run(main())) == 200  # every one heard (no key: its value is None)


def test_an_ended_wait_leaves_its_channel_to_the_reader_and_a_new_wait_keeps_it(
    settings, r
) -> None:
    """Unwatching sends nothing: the reader UNSUBSCRIBEs later, those of many ended waits in
    one command; a channel watched again meanwhile stays subscribed and wakes its new wait."""
    client = InferqClient(settings)
    hub, job_id = client.subscriptions, uuid.uuid4()
    first = hub.watch([result_key(job_id)], confirm_s=10)
    hub.unwatch(first)
    again = hub.watch([result_key(job_id)], confirm_s=10)
    time.sleep(READ_S + 0.5)  # the reader has looked at what it holds to unsubscribe
    _finish(r, [job_id])
    heard: dict[uuid.UUID, bytes | str | None] = {}
    deadline = time.monotonic() + 5
    while job_id not in heard and time.monotonic() < deadline:
        heard.update(hub.wait(again, deadline - time.monotonic()))
    assert heard == {job_id: r.get(result_key(job_id))}
    hub.unwatch(again)
    deadline = time.monotonic() + 5
    while _notify_connections(r):  # and once nobody watches it, it is unsubscribed
        assert time.monotonic() < deadline, _notify_connections(r)
        time.sleep(0.02)
    client.close()


def test_async_ended_waits_unsubscribe_together_and_a_new_wait_keeps_its_channel(
    settings, r
) -> None:
    """An ended async wait returns without a round trip: one flush task UNSUBSCRIBEs what
    the calls that ended meanwhile left; a channel watched again before it runs stays
    subscribed and wakes its new wait; once nobody watches, nothing stays subscribed."""

    def unsubscribes() -> int:
        return int(r.info("commandstats").get("cmdstat_unsubscribe", {}).get("calls", 0))

    async def main() -> tuple[uuid.UUID, dict[uuid.UUID, bytes | str | None]]:
        client = AsyncInferqClient(settings)
        hub, ids = client.subscriptions, [uuid.uuid4() for _ in range(300)]
        watches = [await hub.watch([result_key(i)], confirm_s=10) for i in ids]
        assert sum(int(c["sub"]) for c in _notify_connections(r)) == len(ids)
        before = unsubscribes()
        for watch in watches:
            await hub.unwatch(watch)
        again = await hub.watch([result_key(ids[0])], confirm_s=10)
        deadline = time.monotonic() + 5
        while sum(int(c["sub"]) for c in _notify_connections(r)) > 1:
            assert time.monotonic() < deadline, _notify_connections(r)
            await asyncio.sleep(0.02)
        _finish(r, [ids[0]])
        heard: dict[uuid.UUID, bytes | str | None] = {}
        while ids[0] not in heard and time.monotonic() < deadline:
            heard.update(await hub.wait(again, deadline - time.monotonic()))
        assert unsubscribes() - before < 10  # one command for many ended calls, not 300
        await hub.unwatch(again)
        while _notify_connections(r):
            assert time.monotonic() < deadline, _notify_connections(r)
            await asyncio.sleep(0.02)
        await client.aclose()
        return ids[0], heard

    job_id, heard = asyncio.run(main())
    assert heard == {job_id: r.get(result_key(job_id))}


def test_a_result_written_before_the_wait_is_found(settings, r) -> None:
    job_id = uuid.uuid4()
    r.set(result_key(job_id), _done(job_id))  # no notification at all
    client = InferqClient(settings)
    started = time.monotonic()
    view = client.wait(job_id, timeout=5)
    assert view.status == "done" and view.result.text == f"text of {job_id}"
    assert time.monotonic() - started < 2
    client.close()


def test_concurrent_waits_share_one_connection_and_all_wake(settings, r) -> None:
    client = InferqClient(settings)
    ids = [uuid.uuid4() for _ in range(100)]
    ended: dict[uuid.UUID, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: ended.update({i: client.wait(i, 20).status}))
        for i in ids
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while sum(int(c["sub"]) for c in _notify_connections(r)) < len(ids):
        assert time.monotonic() < deadline, _notify_connections(r)
        time.sleep(0.02)
    assert len(_notify_connections(r)) == 1  # a hundred waits, one subscription
    started = time.monotonic()
    _finish(r, ids)
    for t in threads:
        t.join(20)
    assert ended == dict.fromkeys(ids, "done")
    assert time.monotonic() - started < 5
    while _notify_connections(r):  # each ended wait unsubscribed its channel
        assert time.monotonic() < started + 10, _notify_connections(r)
        time.sleep(0.02)
    client.close()


def _subscription(r: redis.Redis) -> list[int]:
    """The ids of the shared subscriptions' connections, once there is one."""
    deadline = time.monotonic() + 10
    while not (conns := _notify_connections(r)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return [int(c["id"]) for c in conns]


def test_a_wait_carries_on_after_its_connection_is_lost(settings, r) -> None:
    """The server closes the shared connection (as a restart does) and the result is written
    and announced at once, before the client is subscribed again: the resubscription reads
    the key."""
    client = InferqClient(settings)
    first, second = uuid.uuid4(), uuid.uuid4()
    got: list[str] = []
    waiting = threading.Thread(target=lambda: got.append(client.wait(first, 20).status))
    waiting.start()
    kill = _subscription(r)
    started = time.monotonic()
    _finish(r, [first], kill=kill)
    waiting.join(20)
    assert got == ["done"] and time.monotonic() - started < 5
    waiting = threading.Thread(target=lambda: got.append(client.wait(second, 20).status))
    waiting.start()  # a wait that starts after the loss: a working subscription
    while not _notify_connections(r):
        time.sleep(0.02)
    _finish(r, [second])
    waiting.join(20)
    assert got == ["done", "done"] and time.monotonic() - started < 10
    client.close()


def test_an_async_wait_carries_on_after_its_connection_is_lost(settings, r) -> None:
    async def main() -> tuple[str, float]:
        client = AsyncInferqClient(settings)
        job_id = uuid.uuid4()
        try:
            waiting = asyncio.create_task(client.wait(job_id, 20))
            kill = await asyncio.to_thread(_subscription, r)
            started = time.monotonic()
            _finish(r, [job_id], kill=kill)
            view = await waiting
            return view.status, time.monotonic() - started
        finally:
            await client.aclose()

    status, took = asyncio.run(main())
    assert status == "done" and took < 5
