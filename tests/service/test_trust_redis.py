"""The Redis fast path under hostile or unlucky conditions (issue 25): an item too large is
never read whole, bookkeeping follows a message's owner, priority ages at the broker, a live
worker keeps what it holds, and liveness runs on Redis TIME whatever a host's clock says."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis
from service_helpers import envelope, producer, running_worker, wait_for

from api_client.wire import celery_priority
from worker.broker import RedisSource, Unacked, layout, queue_key, redis_source, registry, unacked
from worker.broker.layout import OVERSIZED_ITEMS, UNACKED_INDEX, held_key
from worker.engine.null import NullEngine
from worker.service.app import WorkerService

pytestmark = pytest.mark.services

# Builds the item inside Redis: the test process never holds it either.
_PUSH_BIG = """
local size, head, tail = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local fill = 'A'
while #fill < size do fill = fill .. fill end
redis.call('LPUSH', KEYS[1], head .. string.sub(fill, 1, size - #head - #tail) .. tail)
"""


def _settings(service_settings, name: str, **extra: object):
    return service_settings.model_copy(update={"model": "null", "worker_name": name, **extra})


def _envelope(queue: str, kwargs: dict, tag: str | None = None) -> str:
    return envelope(queue, json.dumps([[], kwargs, {}]), tag=tag)


def _peak_rss_kb(reset: bool = False) -> int:
    if reset:  # Linux: the peak (VmHWM) starts again from the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _send(settings, prompt: str) -> uuid.UUID:
    job_id = uuid.uuid4()
    producer(settings).send_task(
        "inferq.generate",
        queue=settings.queue,
        kwargs={"job_id": str(job_id), "prompt": prompt, "model": "null"},
    )
    return job_id


def test_size_before_parse_an_item_too_large_is_one_dead_letter_never_read_whole(
    service_settings,
) -> None:
    """Finding 9: a 300 MB raw item is neither decoded in Lua nor sent to the worker; a
    worker that took it and died loses nothing; the next one keeps it as one dead letter
    (its real size) and serves the job behind it."""
    settings = _settings(service_settings, "big-live", affinity_dead_after_s=3.0)
    q, size = settings.queue, 300 << 20
    r = redis.Redis.from_url(settings.broker_url, socket_timeout=60)
    head = f'{{"content-type": "application/json", "headers": {{"task": "inferq.generate"}}, "properties": {{"delivery_tag": "{uuid.uuid4()}", "delivery_info": {{"exchange": "{q}", "routing_key": "{q}"}}, "body_encoding": "base64"}}, "body": "'  # noqa: E501
    r.eval(_PUSH_BIG, 1, q, size, head, '"}')
    after = _send(settings, "the job after a huge item")
    started, peak = datetime.now(UTC), _peak_rss_kb(reset=True)
    ghost = RedisSource(_settings(service_settings, "big-ghost"), "big-ghost", ["null"])
    [taken] = ghost.receive(1, 2.0)  # then it dies before keeping a dead letter
    ghost.close()
    grown_mb = (_peak_rss_kb() - peak) / 1024
    assert grown_mb < 100, f"taking it grew the peak RSS by {grown_mb:.0f} MB"
    assert len(taken.body) <= 64 << 10 and taken.oversized is not None
    assert taken.oversized[0] == size
    with running_worker(settings, {"null": NullEngine()}) as service:
        view = wait_for(service.repo, [after], timeout=30)[after]
        deadline, letters = time.monotonic() + 30, []
        while not letters and time.monotonic() < deadline:
            time.sleep(0.2)
            letters = [d for d in service.repo.dead_letters(50) if d["received_at"] >= started]
        time.sleep(2.0)  # it does not come back
        letters = [d for d in service.repo.dead_letters(50) if d["received_at"] >= started]
    grown_mb = (_peak_rss_kb() - peak) / 1024
    assert view.status == "done"
    assert [d["reason"] for d in letters] == ["message too large"]
    payload = letters[0]["payload"]
    assert payload["size"] == size and payload["truncated"] and len(payload["sha1"]) == 40
    assert payload["body"].startswith('{"content-type"') and len(payload["body"]) <= 64 << 10
    assert r.llen(q) == 0 and r.hlen("unacked") == 0 and r.zcard(UNACKED_INDEX) == 0
    assert r.hlen(OVERSIZED_ITEMS) == 0
    assert grown_mb < 100, f"the worker's peak RSS grew by {grown_mb:.0f} MB"


def test_redis_bookkeeping_a_moved_message_leaves_its_owners_held_set(service_settings) -> None:
    """Finding 13a: worker B restoring worker A's expired message takes it out of A's held
    set (A's load is not inflated, nothing leaks); once B has taken it again, reaping A does
    not move B's message."""
    settings = _settings(service_settings, "own-a", visibility_timeout_s=1)
    r = redis.Redis.from_url(settings.broker_url)
    r.lpush(settings.queue, _envelope(settings.queue, {"prompt": "x"}))
    a = RedisSource(settings, "own-a", ["null"])
    b = RedisSource(_settings(service_settings, "own-b", visibility_timeout_s=1), "own-b", ["null"])
    try:
        [got] = a.receive(1, 2.0)
        assert r.smembers(held_key(settings.queue, "own-a")) == {got.handle.encode()}
        time.sleep(1.5)  # A never refreshes it: as if dead
        assert b.restore_expired() == 1
        assert r.scard(held_key(settings.queue, "own-a")) == 0
        [again] = b.receive(1, 2.0)
        assert again.handle == got.handle
        assert b.registry is not None and b.registry.reap([("own-a", 0.0)]) == 0
        assert r.smembers(held_key(settings.queue, "own-b")) == {got.handle.encode()}
        assert r.zscore(UNACKED_INDEX, got.handle) is not None and r.llen(settings.queue) == 0
    finally:
        a.close()
        b.close()


def test_redis_bookkeeping_a_reused_delivery_tag_never_overwrites_a_message_in_flight(
    service_settings,
) -> None:
    """A producer chooses the delivery tag: a second message with the tag of one in flight gets
    a tag of its own, so acknowledging or restoring one never loses the other."""
    settings = _settings(service_settings, "tag-a", visibility_timeout_s=1)
    r = redis.Redis.from_url(settings.broker_url)
    q = settings.queue
    r.lpush(q, _envelope(q, {"prompt": "first"}, tag="same"))
    r.lpush(q, _envelope(q, {"prompt": "second"}, tag="same"))
    source = RedisSource(settings, "tag-a", ["null"])
    try:
        first, second = source.receive(2, 2.0)
        assert first.handle == "same" and second.handle not in ("", "same")
        assert r.hlen("unacked") == 2 and r.zcard(UNACKED_INDEX) == 2
        source.ack([first.handle])
        time.sleep(1.5)  # the second, never acknowledged, comes back whole
        assert source.restore_expired() == 1
        [again] = source.receive(1, 2.0)
        assert b"second" in base64.b64decode(json.loads(r.hget("unacked", again.handle))[0]["body"])
    finally:
        source.close()


def test_redis_bookkeeping_default_worker_names_differ_per_process(service_settings) -> None:
    """Finding 13b: a restarted container (same host name, same pid) gets a new identity."""
    settings = service_settings.model_copy(update={"model": "null", "worker_name": None})
    names = []
    for _ in range(2):
        service = WorkerService(settings, engines={"null": NullEngine()})
        names.append(service.worker)
        service.repo.engine.dispose()
    assert names[0] != names[1]


def test_redis_bookkeeping_a_flood_of_urgent_jobs_does_not_starve_the_others(
    service_settings,
) -> None:
    """Finding 13c: a list kept full at priority 9 lets a priority-0 message through once it
    has waited `broker_aging_s`; before that, priority order holds."""
    settings = _settings(service_settings, "age-w", affinity=False, broker_aging_s=1.0)
    q = settings.queue
    r = redis.Redis.from_url(settings.broker_url)
    urgent, low = queue_key(q, celery_priority(9)), queue_key(q, celery_priority(0))
    r.lpush(low, _envelope(q, {"prompt": "low"}))
    source = RedisSource(settings, "age-w", ["null"])
    try:
        started, origins = time.monotonic(), []
        while low not in origins and time.monotonic() - started < 5:
            r.lpush(urgent, *(_envelope(q, {"prompt": "urgent"}) for _ in range(8)))
            got = source.receive(4, 0.1)
            source.ack([m.handle for m in got])
            origins += [m.origin for m in got]
            time.sleep(0.05)
        waited = time.monotonic() - started
    finally:
        source.close()
    assert low in origins, "the priority-0 message starved"
    assert origins[:4] == [urgent] * 4 and 0.9 <= waited < 3


def _held_job(hold_s: float) -> type[NullEngine]:
    class Slow(NullEngine):
        """Finishes a sequence only `hold_s` after it was added."""

        def step(self):
            time.sleep(0.05)
            if any(time.time() - added < hold_s for _, added in self._queued.values()):
                return []
            return super().step()

    return Slow


def test_a_live_workers_held_messages_stay_visible(service_settings, monkeypatch) -> None:
    """Finding 3 (Redis): a job that runs three times the visibility timeout on a live worker
    is never pushed back nor run twice; a dead worker's message (never refreshed) still comes
    back."""
    moved: list[bytes] = []
    push_back = Unacked.push_back

    def counting(self, tag, *args, **kwargs):
        n = push_back(self, tag, *args, **kwargs)
        if n:
            moved.append(tag if isinstance(tag, bytes) else tag.encode())
        return n

    monkeypatch.setattr(Unacked, "push_back", counting)
    settings = _settings(service_settings, "vis-live", visibility_timeout_s=2)
    r = redis.Redis.from_url(settings.broker_url)
    dead_job = _send(settings, "taken by a worker that then died")
    ghost = RedisSource(
        _settings(service_settings, "vis-ghost", visibility_timeout_s=2), "vis-ghost", ["null"]
    )
    [dead_msg] = ghost.receive(1, 2.0)
    ghost.close()
    long_job = _send(settings, "runs three visibility timeouts")
    long_tag = json.loads(r.lindex(settings.queue, -1))["properties"]["delivery_tag"]
    with running_worker(settings, {"null": _held_job(6.0)()}) as service:
        views = wait_for(service.repo, [dead_job, long_job], timeout=60)
    assert [views[j].status for j in (dead_job, long_job)] == ["done", "done"]
    assert views[long_job].attempts == 1 and views[dead_job].attempts == 1
    assert long_tag.encode() not in moved
    assert dead_msg.handle.encode() in moved


class _FastOnMainThread:
    """`time` for the modules under test: 60 s fast for calls on the main thread only (the
    skewed worker below), true for the live peer's heartbeat thread."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + (60.0 if threading.current_thread() is threading.main_thread() else 0)


def test_one_clock_a_fast_host_neither_restores_nor_reaps_a_live_peer(
    service_settings, monkeypatch
) -> None:
    """Finding 7 (Redis): a worker whose host clock is 60 s fast sees a live peer as live
    and leaves the messages it holds alone (both use Redis TIME, not the host's clock)."""
    settings = _settings(
        service_settings, "clk-live", visibility_timeout_s=30, affinity_dead_after_s=10.0
    )
    r = redis.Redis.from_url(settings.broker_url)
    r.lpush(settings.queue, _envelope(settings.queue, {"prompt": "held by a live worker"}))
    live = RedisSource(settings, "clk-live", ["null"])
    fast = None
    try:
        [held] = live.receive(1, 2.0)
        for module in (redis_source, registry, unacked, layout):
            monkeypatch.setattr(module, "time", _FastOnMainThread(), raising=False)
        fast = RedisSource(
            _settings(
                service_settings, "clk-fast", visibility_timeout_s=30, affinity_dead_after_s=10.0
            ),
            "clk-fast",
            ["null"],
        )
        assert fast.restore_expired() == 0
        fast.tick(list)  # looks at its peers and reaps the dead ones
        assert "clk-live" in fast.router.peers
        assert r.zscore(UNACKED_INDEX, held.handle) is not None
        assert r.sismember(held_key(settings.queue, "clk-live"), held.handle)
    finally:
        live.close()
        if fast is not None:
            fast.close()
