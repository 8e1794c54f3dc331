"""An idle worker hears a push at once (worker/broker/doorbell.py): a job a plain Celery
producer sends to an empty queue is taken within a round trip, not after the poll interval
an idle queue backs off to. The poll interval is made 5 s here, so a source that only polls
fails these tests; the bound they check is generous (2 s) for a loaded 2-core machine."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from api_client.schema import JobMessage
from api_client.wire import TASK_NAME, producer_app, send_job
from inferq.settings import get_settings
from worker.broker import RedisSource, redis_source
from worker.broker.doorbell import Doorbell

pytestmark = pytest.mark.services
POLL_S = 5.0


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(redis_source, "IDLE_SLEEP_S", (POLL_S, POLL_S))
    monkeypatch.setattr(redis_source, "BELL_POLL_S", POLL_S)
    return get_settings(
        home=tmp_path / "home",
        broker_url=redis_url,
        affinity=False,
        queue=f"inferq-bell-{uuid.uuid4().hex[:8]}",
    )


def _later(delay: float, send) -> list[float]:
    """Run `send` after `delay` s on a thread; the list gets the time it was sent."""
    sent: list[float] = []

    def run() -> None:
        time.sleep(delay)
        send()
        sent.append(time.monotonic())

    threading.Thread(target=run, daemon=True).start()
    return sent


def _taken(source: RedisSource, sent: list[float]) -> tuple[int, float]:
    got = source.receive(8, wait_s=3 * POLL_S)
    return len(got), time.monotonic() - sent[0]


def test_a_plain_send_task_wakes_an_idle_source(settings) -> None:
    source = RedisSource(settings, "w1")
    try:
        assert source._bell.works
        assert source.receive(8, wait_s=0.0) == []  # empty: the next wait is a whole poll
        app = producer_app(settings)  # the documented message, no inferq code on the way
        body = {"prompt": "ring", "tenant": "acme"}
        sent = _later(0.3, lambda: app.send_task(TASK_NAME, kwargs=body, queue=settings.queue))
        count, after = _taken(source, sent)
        assert count == 1
        assert after < 2.0, f"taken {after:.2f} s after the push: the poll, not the bell"
    finally:
        source.close()


def test_an_idle_source_with_a_bell_polls_rarely(settings, monkeypatch) -> None:
    """Where the bell works, polling an empty queue only covers a ring lost: called every
    50 ms (more often than the intake, which waits 0.25 s a call), an idle source takes from
    the queue ever less often, up to once a second (it took twice per call before: at the call
    and after its wait)."""
    monkeypatch.setattr(redis_source, "IDLE_SLEEP_S", (0.005, 0.25))
    monkeypatch.setattr(redis_source, "BELL_POLL_S", 1.0)
    source = RedisSource(settings, "w1")
    takes: list[float] = []
    take = source._take
    source._take = lambda **kw: takes.append(time.monotonic()) or take(**kw)  # type: ignore[method-assign]
    try:
        assert source._bell.works
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            assert source.receive(8, 0.05) == []
        assert len(takes) <= 12, len(takes)  # 0.005 s doubling to 1 s: 10 in 3 s
        assert takes[-1] - takes[-2] >= 0.9
    finally:
        source.close()


def test_each_push_rings_again(settings) -> None:
    """The bell re-arms after it rang: a second and a third push are heard too, at every
    priority list."""
    source = RedisSource(settings, "w1")
    app = producer_app(settings)
    try:
        for priority in (0, 9, 0):
            job = JobMessage(
                prompt="again", tenant="acme", priority=priority, submitted_at=datetime.now(UTC)
            )
            sent = _later(0.2, lambda job=job: send_job(app, settings.queue, job, None))
            count, after = _taken(source, sent)
            assert count == 1 and after < 2.0, (priority, count, after)
    finally:
        source.close()


def test_a_redis_that_refuses_tracking_is_polled(settings, redis_url: str) -> None:
    """A user without CLIENT TRACKING (an ACL, or a Redis older than 6): the bell sleeps its
    timeout, as polling did."""
    admin = redis.Redis.from_url(redis_url)
    name = f"bell-{uuid.uuid4().hex[:6]}"
    admin.execute_command("ACL", "SETUSER", name, "on", ">pw", "~*", "&*", "+@all", "-client")
    try:
        url = redis_url.replace("redis://", f"redis://{name}:pw@")
        bell = Doorbell(redis.ConnectionPool.from_url(url), [settings.queue])
        assert not bell.works
        start = time.monotonic()
        bell.wait(0.2)
        assert time.monotonic() - start >= 0.2
    finally:
        admin.execute_command("ACL", "DELUSER", name)
