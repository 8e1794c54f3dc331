"""The streamer's writes on the real Redis: a stream's expiry is set with its first and last
delta and refreshed in between only once a tenth of it has passed."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from api_client.results import stream_key
from inferq.settings import get_settings
from worker.engine.api import TextDelta
from worker.service import streamer as streamer_module
from worker.service.metrics import Metrics
from worker.service.streamer import Streamer

pytestmark = pytest.mark.services
EXPIRES_S = 1000


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _streamer(client: redis.Redis) -> Streamer:
    return Streamer(get_settings(stream_expires_s=EXPIRES_S), client, Metrics())


def test_expiry_with_the_first_and_last_delta_and_a_refresh_after_a_tenth(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamer, job = _streamer(client), str(uuid.uuid4())
    key = stream_key(job)
    now = [5000.0]
    monkeypatch.setattr(streamer_module.time, "monotonic", lambda: now[0])

    streamer.write([TextDelta(job, 0, "a")])
    assert 0 < client.ttl(key) <= EXPIRES_S
    client.persist(key)  # from here, a TTL shows that a delta sent EXPIRE again
    now[0] += EXPIRES_S * streamer_module.REFRESH_SHARE - 1
    streamer.write([TextDelta(job, 1, "b")])
    assert client.ttl(key) == -1  # within a tenth of the expiry: not refreshed
    now[0] += 2
    streamer.write([TextDelta(job, 2, "c")])
    assert 0 < client.ttl(key) <= EXPIRES_S  # a tenth passed: refreshed
    client.persist(key)
    streamer.write([TextDelta(job, 3, "d", "stop")])
    assert 0 < client.ttl(key) <= EXPIRES_S  # the last delta always sets it
    assert job not in streamer._expiry_sent
    texts = [fields[b"d"] for _, fields in client.xrange(key)]
    assert texts == [b"a", b"b", b"c", b"d"]
    client.delete(key)


def test_a_job_the_streamer_has_not_seen_gets_its_expiry(client: redis.Redis) -> None:
    """A delta that continues a run this streamer did not start (a restart) sets it too."""
    streamer, job = _streamer(client), str(uuid.uuid4())
    streamer.write([TextDelta(job, 7, "later")])
    assert 0 < client.ttl(stream_key(job)) <= EXPIRES_S
    client.delete(stream_key(job))


def _entries(client: redis.Redis, job: str) -> list[bytes]:
    return [fields[b"d"] for _, fields in client.xrange(stream_key(job))]


@pytest.mark.parametrize(("per_s", "paced"), [(10.0, True), (1e6, False)])
def test_writes_are_paced_and_the_steps_between_join_into_one_entry(
    client: redis.Redis, per_s: float, paced: bool
) -> None:
    """After a write of 4 entries at 10 a second the streamer waits 0.4 s: the 4 steps that
    come meanwhile (20 ms apart) become one entry per job; unpaced, steps are written as
    they come (more entries)."""
    settings = get_settings(stream_expires_s=EXPIRES_S, stream_entries_per_s=per_s)
    streamer = Streamer(settings, client, Metrics())
    jobs = [str(uuid.uuid4()) for _ in range(4)]
    streamer.start()
    try:
        streamer.put([TextDelta(j, 0, "a") for j in jobs])
        while not all(client.exists(stream_key(j)) for j in jobs):
            time.sleep(0.005)
        for n, piece in enumerate("bcde", start=1):
            streamer.put([TextDelta(j, n, piece, "stop" if piece == "e" else None) for j in jobs])
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while not all(_entries(client, j)[-1:] and b"e" in _entries(client, j)[-1] for j in jobs):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        streamer.stop()
    for job in jobs:
        assert b"".join(_entries(client, job)) == b"abcde"
        entries = len(_entries(client, job))
        assert (entries == 2) if paced else (entries > 2)
        client.delete(stream_key(job))
