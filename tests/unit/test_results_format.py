"""The results' wire format (Celery's meta), cancel requests, revokes, job ids and the stream
reader, without Redis: what workers write is what Celery and our clients read, and nothing
malformed or foreign is read as a job."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError

from api_client import cancels
from api_client.producer import idempotent_job_id, job_id_of, tenant_view
from api_client.results import (
    JobExpired,
    JobFailed,
    encode,
    from_meta,
    result_key,
    to_meta,
)
from api_client.streams import StreamReader
from storage.records import JobView, MetricsRow, ResultRow
from worker.service.control import revoked_ids

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
KEY = "a-signing-key-of-32-characters!!"


def _view(status: str, **more) -> JobView:
    base = dict(
        id=uuid.uuid4(),
        tenant="acme",
        model="m",
        status=status,
        priority=0,
        attempts=1,
        error=None,
        queued_at=NOW,
        started_at=NOW,
        finished_at=None,
        worker="w",
        batch_id=None,
    )
    return JobView(**{**base, **more})


def _ended(status: str, **more) -> JobView:
    return _view(status, finished_at=NOW, **more)


DONE_ID = uuid.uuid4()
DONE = _ended(
    "done",
    id=DONE_ID,
    result=ResultRow(DONE_ID, "Paris.", "stop", 7, 3, 0),
    metrics=MetricsRow(DONE_ID, queue_wait_s=0.5, ttft_s=0.7, list_cost=Decimal("0.001")),
)


@pytest.fixture(scope="module")
def backend():
    """Celery's own Redis result backend (it decodes; nothing connects)."""
    return Celery(broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0").backend


@pytest.mark.parametrize(
    ("view", "state", "raises"),
    [
        (_view("running"), "STARTED", None),
        (DONE, "SUCCESS", None),
        (_ended("failed", error="engine error: boom"), "FAILURE", JobFailed),
        (_ended("expired", error="its deadline passed"), "FAILURE", JobExpired),
        (_ended("cancelled"), "REVOKED", TaskRevokedError),
    ],
    ids=["running", "done", "failed", "expired", "cancelled"],
)
def test_each_state_as_celery_reads_it_and_back(backend, view, state, raises) -> None:
    meta = to_meta(view)
    raw = encode(meta)
    celery_meta = backend.decode_result(raw)
    assert celery_meta["status"] == state and celery_meta["task_id"] == str(view.id)
    assert celery_meta["children"] == [] and celery_meta["traceback"] is None
    assert (celery_meta["date_done"] is None) == (state == "STARTED")
    if raises is None:
        assert celery_meta["result"] == view.to_dict()  # the job, as JobView.to_dict() writes
    else:
        exc = celery_meta["result"]
        assert type(exc) is raises  # our classes, once loaded; Celery's own for a revoke
        assert str(exc) == (view.error or "cancelled")
    back = from_meta(raw, view.id)
    assert back == view  # every field, the result's and the metrics' included


def test_queued_has_no_key() -> None:
    assert to_meta(_view("queued", started_at=None)) is None


GARBAGE = [
    b"",
    b"not json",
    b"[1, 2]",
    b'{"status": "SUCCESS"}',
    b'{"status": "WEIRD", "result": {}}',
    json.dumps({"status": "SUCCESS", "result": {"id": "nope"}}).encode(),
    json.dumps({"status": "SUCCESS", "result": {**DONE.to_dict(), "bogus": 1}}).encode(),
    json.dumps({"status": "SUCCESS", "result": {**DONE.to_dict(), "status": "failed"}}).encode(),
    json.dumps({"status": "FAILURE", "result": DONE.to_dict()}).encode(),  # no `job`
    b"[" * 100_000 + b"]" * 100_000,
    b" " * (9 << 20),
]


@pytest.mark.parametrize("raw", GARBAGE, ids=range(len(GARBAGE)))
def test_a_malformed_or_foreign_value_is_no_job(raw: bytes) -> None:
    assert from_meta(raw) is None


def test_a_meta_of_another_job_or_tenant_is_not_read() -> None:
    raw = encode(to_meta(DONE))
    assert from_meta(raw, uuid.uuid4()) is None  # under another job's key
    assert tenant_view(raw, DONE.id, "acme") == DONE
    assert tenant_view(raw, DONE.id, "mallory") is None


def test_job_ids_of_keys_and_idempotency_keys() -> None:
    job_id = uuid.uuid4()
    assert job_id_of(result_key(job_id).encode()) == job_id
    assert job_id_of("inferq:cancel") is None and job_id_of(result_key("x")) is None
    same = idempotent_job_id("acme", "order-42", None)
    assert same == idempotent_job_id("acme", "order-42", None) and same.version == 4
    assert same != idempotent_job_id("globex", "order-42", None)
    assert same != idempotent_job_id("acme", "order-43", None)
    assert same != idempotent_job_id("acme", "order-42", KEY)  # keyed: nobody else can tell


# -- cancel requests and revokes -------------------------------------------------------------


def test_cancel_requests_cancel_only_what_the_rules_allow() -> None:
    job = uuid.uuid4()
    keys = {"alice": (KEY,)}
    signed = cancels.parse(cancels.request(job, "alice", KEY).encode(), job)
    unsigned = cancels.parse(cancels.request(job, "alice").encode(), job)
    other_key = cancels.parse(cancels.request(job, "alice", "z" * 32).encode(), job)
    revoke = cancels.parse(cancels.CancelRequest(job, None).encode(), job)
    bob = cancels.parse(cancels.request(job, "bob").encode(), job)
    for_other_job = cancels.request(uuid.uuid4(), "alice", KEY)
    assert cancels.allowed(signed, "alice", keys)
    assert not any(cancels.allowed(r, "alice", keys) for r in (unsigned, other_key, revoke, bob))
    assert cancels.allowed(unsigned, "carol-alike", {}) is False  # another tenant's name
    assert cancels.allowed(bob, "bob", keys) and cancels.allowed(revoke, "bob", keys)
    assert not cancels.allowed(bob, "bob", keys, require_signature=True)
    assert not cancels.allowed(revoke, "bob", keys, require_signature=True)
    replayed = cancels.CancelRequest(job, "alice", for_other_job.signature)
    assert not cancels.allowed(replayed, "alice", keys)  # a signature is for one job
    for raw in (
        b"x",
        b"{}",
        b'{"job_id": "nope"}',
        b'{"job_id": 1}',
        b"[" * 5000,
        json.dumps({"job_id": str(job), "tenant": 3}).encode(),
        b"{" + b" " * 2000 + b"}",
        for_other_job.encode().encode(),
    ):
        assert cancels.parse(raw, job) is None


def _broadcast(command: dict, content_type: str = "application/json") -> bytes:
    body = base64.b64encode(json.dumps(command).encode()).decode()
    return json.dumps(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": {"clock": 1},
            "properties": {"body_encoding": "base64"},
        }
    ).encode()


def test_only_revoke_commands_are_read() -> None:
    ids = [uuid.uuid4(), uuid.uuid4()]
    revoke = {"method": "revoke", "arguments": {"task_id": str(ids[0]), "terminate": True}}
    assert revoked_ids(_broadcast(revoke)) == [ids[0]]
    many = {"method": "revoke", "arguments": {"task_id": [str(i) for i in ids] + ["x", 5]}}
    assert revoked_ids(_broadcast(many)) == ids
    huge = {"method": "revoke", "arguments": {"task_id": [str(uuid.uuid4())] * 1000}}
    assert len(revoked_ids(_broadcast(huge))) == 100
    for command in (
        {"method": "shutdown"},
        {"method": "pool_restart", "arguments": {}},
        {"method": "revoke"},
        {"method": "revoke", "arguments": {"task_id": 7}},
        ["revoke"],
    ):
        assert revoked_ids(_broadcast(command)) == []
    assert revoked_ids(_broadcast(revoke, "application/x-python-serialize")) == []
    for raw in (b"", b"not json", b'{"body": "%%%"}', b"[" * 100_000):
        assert revoked_ids(raw) == []


# -- the stream reader -------------------------------------------------------------------------


def _entries(*fields: dict) -> list:
    return [
        (f"{n}-0".encode(), {k.encode(): str(v).encode() for k, v in f.items()})
        for n, f in enumerate(fields, 1)
    ]


def test_stream_reader_joins_deltas_and_ends() -> None:
    reader = StreamReader(DONE.id, "acme")
    got = reader.feed(_entries({"o": 0, "d": "Pa"}, {"o": 2, "d": "ris"}))
    assert got == ["Paris"] and not reader.finished and reader.last_id == b"2-0"
    got += reader.feed(_entries({"o": 5, "d": ".", "end": "stop"}))
    assert reader.finished and "".join(got + reader.rest()) == "Paris."


def test_stream_reader_skips_a_reruns_repeat_and_takes_a_gap_from_the_result() -> None:
    reader = StreamReader(DONE.id, "acme")
    got = reader.feed(_entries({"o": 0, "d": "Pa"}, {"o": 0, "d": "Par"}, {"o": 9, "d": "x"}))
    assert got == ["Par"] and reader.wants_result(True)  # a gap: the result says the rest
    reader.result(encode(to_meta(_view("running"))))
    assert not reader.finished
    reader.result(encode(to_meta(DONE)))
    assert reader.finished and "".join(got + reader.rest()) == "Paris."


def test_stream_reader_raises_the_jobs_error() -> None:
    failed = _ended("failed", error="engine error: boom")
    reader = StreamReader(failed.id, "acme")
    reader.feed(_entries({"o": 0, "d": "Pa"}, {"end": "failed"}))
    reader.result(encode(to_meta(failed)))
    with pytest.raises(JobFailed, match="boom"):
        reader.rest()
    other = StreamReader(DONE.id, "mallory")  # another tenant's job: never read
    other.result(encode(to_meta(DONE)))
    assert not other.finished
