"""Hostile and malformed messages pushed straight onto the Redis queue: the worker keeps
running, every message ends as a job row or a dead letter, none is retried, and a normal job
is served after them."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis
import sqlalchemy as sa
from service_helpers import envelope as _envelope
from service_helpers import running_worker, wait_for

from storage.models import jobs_table

pytestmark = [pytest.mark.model, pytest.mark.services]

NAN_PARAMS = '"params": {"temperature": NaN}'  # json.dumps would not write this


def _raw_body(kwargs_text: str) -> str:
    """A Celery body around kwargs written as JSON text (what json.dumps would not write)."""
    return "[[], {" + kwargs_text + "}, {}]"


def _job_body(**kwargs: object) -> str:
    return json.dumps([[], kwargs, {"callbacks": None}])


def test_hostile_messages_never_stop_the_worker(service_settings, paged_engine) -> None:
    settings = service_settings.model_copy(update={"tenant_keys": "keyed=" + "k" * 32})
    q = settings.queue
    r = redis.Redis.from_url(settings.broker_url)
    names = ("nul", "surrogate", "nan", "future", "after", "tiny", "alice", "accent")
    ids = {name: uuid.uuid4() for name in names}
    raw_jobs = {  # a job row each: refused as invalid or run
        "future": _job_body(
            job_id=str(ids["future"]),
            prompt="Hi",
            params={"max_tokens": 2},
            submitted_at="9999-01-01T00:00:00Z",
        ),
        "tiny": _job_body(
            job_id=str(ids["tiny"]),
            prompt="Hi",
            params={"max_tokens": 2, "temperature": 1e-300, "seed": 1},
        ),
        "alice": _job_body(
            job_id=str(ids["alice"]), tenant="alice", prompt="Say hi.", params={"max_tokens": 3}
        ),
    }
    hostile = [
        "not json at all",
        json.dumps({"body": "%%% not base64", "properties": {"body_encoding": "base64"}}),
        json.dumps({"body": "e30=", "content-type": "application/json"}),  # no properties
        _envelope(q, json.dumps({"prompt": "x"})),  # a dict, not Celery's triple
        _envelope(q, "null"),
        _envelope(q, "[[1], {}, {}]"),  # positional args
        _envelope(q, _job_body(prompt="x", self="me")),
        _envelope(q, json.dumps([[], "kwargs as a string", {}])),
        _envelope(q, _job_body(job_id=str(ids["nul"]), prompt="a\u0000b")),
        _envelope(q, _raw_body(f'"job_id": "{ids["surrogate"]}", "prompt": "a\\ud800b"')),
        _envelope(q, _raw_body(f'"job_id": "{ids["nan"]}", "prompt": "x", ' + NAN_PARAMS)),
        _envelope(q, _job_body(prompt="x" * (2 << 20))),  # over the 1 MB message limit
        _envelope(q, b"\x80\x04\x95pickle", content_type="application/x-python-serialize"),
        _envelope(q, _job_body(prompt="x"), task="celery.accumulate"),
        _envelope(q, "[" * 5000),  # nested deeper than Python's recursion limit
        _envelope(
            q,
            _job_body(
                job_id=str(ids["accent"]), tenant="keyed", prompt="x", signature="\u00e9" * 64
            ),
        ),  # non-ASCII signature, keyed tenant
        _envelope(q, raw_jobs["alice"]),  # alice's job, first
        _envelope(
            q,
            _job_body(
                job_id=str(ids["alice"]),
                tenant="mallory",
                prompt="Say bye.",
                params={"max_tokens": 3},
            ),
        ),  # its id, another tenant: taken
        _envelope(q, raw_jobs["future"]),
        _envelope(q, raw_jobs["tiny"]),
    ]
    started = datetime.now(UTC)
    for item in hostile:
        r.lpush(q, item)
    r.lpush(
        q,
        _envelope(
            q, _job_body(job_id=str(ids["after"]), prompt="Say hi.", params={"max_tokens": 3})
        ),
    )
    with running_worker(settings, {paged_engine.model_name: paged_engine}) as worker:
        served = [ids[name] for name in ("future", "after", "tiny", "alice")]
        views = wait_for(worker.repo, served)
        deadline = time.monotonic() + 20
        letters: list[dict] = []
        while len(letters) < len(hostile) - len(raw_jobs) and time.monotonic() < deadline:
            letters = [d for d in worker.repo.dead_letters(500) if d["received_at"] >= started]
            time.sleep(0.2)
        assert worker.alive() and r.llen(q) == 0
    assert all(views[i].status == "done" for i in served)
    future = views[ids["future"]]
    assert future.status == "done" and 0 <= future.metrics.queue_wait_s < 60
    stored = _stored(worker.repo, [ids["tiny"], ids["alice"]])
    assert stored[ids["tiny"]].params["temperature"] == 0.01  # clamped as vLLM does
    alice = stored[ids["alice"]]
    assert (alice.tenant, alice.prompt, alice.attempts) == ("alice", "Say hi.", 1)
    assert len(letters) == len(hostile) - len(raw_jobs), [d["reason"] for d in letters]
    invalid = {d["job_id"]: d for d in letters if d["reason"] == "invalid job message"}
    assert {ids["nul"], ids["surrogate"], ids["nan"], ids["accent"]} <= invalid.keys()
    assert "NUL" in invalid[ids["nul"]]["error"] and "finite" in invalid[ids["nan"]]["error"]
    assert "signature" in invalid[ids["accent"]]["error"]
    [taken] = [d for d in letters if d["reason"] == "job id taken"]
    assert taken["job_id"] == ids["alice"] and "mallory" in taken["payload"]["body"]
    assert any(d["reason"] == "undecodable message" and "Recursion" in d["error"] for d in letters)
    big = next(d for d in letters if d["reason"] == "message too large")
    assert big["payload"]["truncated"] and big["payload"]["size"] > 2 << 20
    assert len(big["payload"]["body"]) <= 64 << 10
    assert worker.repo.get_many([ids["nul"], ids["surrogate"], ids["nan"], ids["accent"]]) == {}
    assert r.hlen("unacked") == 0  # nothing left waiting for a redelivery


def _stored(repo, ids: list[uuid.UUID]) -> dict:
    """Job rows as stored (tenant, prompt, params, attempts), by id."""
    J = jobs_table
    query = sa.select(J.c.id, J.c.tenant, J.c.prompt, J.c.params, J.c.attempts)
    with repo.engine.connect() as conn:
        return {row.id: row for row in conn.execute(query.where(J.c.id.in_(ids)))}


def _hostile_kinds(q: str, i: int) -> list[str]:
    """Fourteen kinds of message that must become dead letters, varied by `i`."""
    job_id = str(uuid.uuid4())
    return [
        f"not json at all #{i}",
        json.dumps({"body": f"%%% {i}", "properties": {"body_encoding": "base64"}}),
        json.dumps({"body": "e30=", "content-type": "application/json", "n": i}),
        _envelope(q, json.dumps({"prompt": f"x{i}"})),
        _envelope(q, "null" if i % 2 else "[]"),
        _envelope(q, f"[[{i}], {{}}, {{}}]"),
        _envelope(q, _job_body(prompt=f"x{i}", self="me")),
        _envelope(q, json.dumps([[], f"kwargs {i}", {}])),
        _envelope(q, _job_body(job_id=job_id, prompt=f"a\u0000{i}")),
        _envelope(q, _raw_body(f'"prompt": "a\\udc{i % 10}0b"')),
        _envelope(q, _raw_body(f'"prompt": "x{i}", ' + NAN_PARAMS)),
        _envelope(q, _job_body(prompt="y" * ((1 << 20) + i))),
        _envelope(q, bytes([0x80, 4, i % 256]), content_type="application/x-python-serialize"),
        _envelope(q, _job_body(prompt=f"x{i}"), task=f"celery.chord_unlock.{i}"),
    ]


def test_fifty_six_hostile_messages_each_followed_by_a_served_job(
    service_settings, paged_engine
) -> None:
    q = service_settings.queue
    r = redis.Redis.from_url(service_settings.broker_url)
    started, normal, hostile = datetime.now(UTC), [], 0
    for i in range(4):
        for item in _hostile_kinds(q, i):
            r.lpush(q, item)
            hostile += 1
            normal.append(uuid.uuid4())
            body = _job_body(job_id=str(normal[-1]), prompt=f"Say {i}.", params={"max_tokens": 1})
            r.lpush(q, _envelope(q, body))
    with running_worker(service_settings, {paged_engine.model_name: paged_engine}) as worker:
        views = wait_for(worker.repo, normal, timeout=300)
        deadline = time.monotonic() + 30
        refused = 0  # messages kept whole, or folded with others of their reason (count)
        while refused < hostile and time.monotonic() < deadline:
            letters = [d for d in worker.repo.dead_letters(500) if d["received_at"] >= started]
            refused = sum(d["payload"].get("folded", 1) for d in letters)
            time.sleep(0.2)
        assert worker.alive()
    assert hostile >= 50 and refused == hostile
    assert all(v.status == "done" and v.attempts == 1 for v in views.values())
    assert r.llen(q) == 0 and r.hlen("unacked") == 0  # none waits for a redelivery
