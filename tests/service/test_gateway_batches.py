"""The Batch API through the official `openai` SDK: upload a JSONL file, create a batch,
poll it, download its output and error files (one line per custom_id), cancel one; a batch
paced by its tenant's token quota; against a real worker on the null engine, the real Redis
and PostgreSQL."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator

import openai
import pytest
import redis
import sqlalchemy as sa
from gateway_helpers import new_key, not_near_a_minute_end, quota_used, serving
from service_helpers import records, running_worker

from gateway.quota import QUOTA_PREFIX
from storage.api_keys import ApiKeys
from worker.engine.null import NullEngine

pytestmark = pytest.mark.services
ENDPOINT = "/v1/chat/completions"
LINE_COST = 1 + 13  # a 3-character custom_id as its content (1 token) and max_tokens=13


@pytest.fixture
def settings(service_settings):
    return service_settings.model_copy(update={"model": "null", "gateway_key_cache_s": 0.0})


def _line(custom_id: str, **body) -> str:
    request = {"model": "null", "messages": [{"role": "user", "content": custom_id}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": request})


def _upload(client: openai.OpenAI, lines: list[str]) -> str:
    data = io.BytesIO(("\n".join(lines) + "\n").encode())
    return client.files.create(file=("requests.jsonl", data), purpose="batch").id


def _until(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 60):
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)
    return batch


def _jsonl(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.fixture
def client(settings) -> Iterator[openai.OpenAI]:
    with (
        serving(settings) as url,
        openai.OpenAI(base_url=url, api_key=new_key(settings, "acme"), max_retries=0) as c,
    ):
        c.base_url_for_tests = url
        yield c


def test_a_batch_round_trip_one_line_per_custom_id(settings, client) -> None:
    good = [f"req-{i}" for i in range(40)]
    lines = [_line(c, max_tokens=1 + i % 3) for i, c in enumerate(good)]
    lines += [_line("two-choices", n=2), _line("too-long", max_tokens=5000)]
    input_id = _upload(client, lines)
    assert client.files.retrieve(input_id).bytes == len(("\n".join(lines) + "\n").encode())
    assert client.files.content(input_id).text.splitlines() == lines
    with running_worker(settings, {"null": NullEngine()}):
        batch = client.batches.create(
            input_file_id=input_id,
            endpoint=ENDPOINT,
            completion_window="24h",
            metadata={"run": "1"},
        )
        assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "1"}
        done = _until(client, batch.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (42, 40, 2)
    assert done.completed_at >= done.in_progress_at >= done.created_at
    output = _jsonl(client, done.output_file_id)
    assert [o["custom_id"] for o in output] == good  # one line each, in the input's order
    for i, line in enumerate(output):
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == 1 + i % 3
        assert body["id"] == f"chatcmpl-{line['response']['request_id'].replace('-', '')}"
    errors = {e["custom_id"]: e["response"] for e in _jsonl(client, done.error_file_id)}
    assert set(errors) == {"two-choices", "too-long"}
    assert errors["two-choices"]["status_code"] == 400
    assert errors["two-choices"]["body"]["error"]["param"] == "n"
    assert errors["too-long"]["body"]["error"]["type"] == "invalid_request_error"
    assert [b.id for b in client.batches.list()] == [done.id]
    with records(settings).engine.connect() as conn:  # the batches report, beside job_metrics
        usage = conn.execute(
            sa.text("SELECT * FROM api_batch_usage WHERE batch_id = :id"),
            {"id": uuid.UUID(done.id.removeprefix("batch_"))},
        ).one()
    assert (usage.requests, usage.completed, usage.refused) == (42, 40, 2)
    assert usage.completion_tokens == sum(1 + i % 3 for i in range(40))

    other_key = new_key(settings, "other")
    with openai.OpenAI(
        base_url=client.base_url_for_tests, api_key=other_key, max_retries=0
    ) as other:
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(done.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(done.output_file_id)


def test_a_malformed_file_fails_validation_and_nothing_runs(settings, client) -> None:
    lines = [
        _line("a"),
        _line("a"),
        "not json",
        json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {}}),
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, lines), endpoint=ENDPOINT, completion_window="24h"
    )
    failed = _until(client, batch.id, {"failed", "in_progress", "completed"})
    assert failed.status == "failed"
    assert [e.line for e in failed.errors.data] == [2, 3, 4]
    assert failed.request_counts.total == 4 and failed.output_file_id is None
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=batch.input_file_id, endpoint="/v1/embeddings", completion_window="24h"
        )


def test_cancel_a_batch_before_any_worker_takes_it(settings, client) -> None:
    lines = [_line(f"c-{i}", max_tokens=2) for i in range(10)]
    batch = client.batches.create(
        input_file_id=_upload(client, lines), endpoint=ENDPOINT, completion_window="24h"
    )
    _until(client, batch.id, {"in_progress"})
    assert client.batches.cancel(batch.id).status == "cancelling"
    with running_worker(settings, {"null": NullEngine()}):  # takes them: they never run
        cancelled = _until(client, batch.id, {"cancelled"})
    assert cancelled.request_counts.completed == 0 and cancelled.request_counts.failed == 10
    errors = _jsonl(client, cancelled.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == sorted(f"c-{i}" for i in range(10))
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"job_cancelled"}


def test_files_list_retrieve_delete_are_the_tenants_own(settings, client) -> None:
    url = client.base_url_for_tests
    tenant = f"lister-{uuid.uuid4().hex[:8]}"  # the database is shared by this file's tests
    client = openai.OpenAI(base_url=url, api_key=new_key(settings, tenant), max_retries=0)
    mine = [_upload(client, [_line(f"f-{i}")]) for i in range(3)]
    other = openai.OpenAI(base_url=url, api_key=new_key(settings, f"{tenant}-2"), max_retries=0)
    with client, other:
        theirs = _upload(other, [_line("theirs")])
        assert [f.id for f in client.files.list()] == mine[::-1]  # newest first, own only
        assert [f.id for f in client.files.list(limit=2)] == mine[::-1]  # two pages
        page = client.files.list(limit=2, order="asc")
        assert [f.id for f in page.data] == mine[:2] and page.has_more
        assert [f.id for f in client.files.list(after=mine[0], order="asc")] == mine[1:]
        assert list(client.files.list(purpose="batch_output")) == []
        assert [f.id for f in other.files.list()] == [theirs]
        for act in (client.files.retrieve, client.files.content, client.files.delete):
            with pytest.raises(openai.NotFoundError):
                act(theirs)
        assert other.files.retrieve(theirs).id == theirs  # still there for its tenant
        _delete_own(client, mine)


def _delete_own(client: openai.OpenAI, mine: list[str]) -> None:
    deleted = client.files.delete(mine[1])
    assert (deleted.id, deleted.object, deleted.deleted) == (mine[1], "file", True)
    for act in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            act(mine[1])
    assert [f.id for f in client.files.list()] == [mine[2], mine[0]]

    batch = client.batches.create(  # no worker: its jobs stay queued, the batch running
        input_file_id=mine[0], endpoint=ENDPOINT, completion_window="24h"
    )
    _until(client, batch.id, {"in_progress"})
    with pytest.raises(openai.ConflictError) as caught:
        client.files.delete(mine[0])
    assert caught.value.body["code"] == "file_in_use"
    assert client.files.retrieve(mine[0]).id == mine[0]


@pytest.fixture
def quota_client(settings) -> Iterator[tuple[openai.OpenAI, str]]:
    """A client of a tenant of its own (fresh counters in Redis), on a gateway whose batch
    lease is short: a batch waiting on its quota tries again every lease/3 (0.67 s)."""
    settings = settings.model_copy(update={"gateway_batch_lease_s": 2.0})
    tenant = f"bq-{uuid.uuid4().hex[:8]}"
    with (
        serving(settings) as url,
        openai.OpenAI(base_url=url, api_key=new_key(settings, tenant), max_retries=0) as c,
    ):
        yield c, tenant


def _sent(settings, batch_id: str) -> int:
    """The batch's lines noted as sent (their jobs enqueued)."""
    with records(settings).engine.connect() as conn:
        return conn.scalar(
            sa.text("SELECT count(sent_at) FROM api_batch_requests WHERE batch_id = :id"),
            {"id": uuid.UUID(batch_id.removeprefix("batch_"))},
        )


def test_a_batch_over_its_minute_quota_waits_for_the_window(settings, quota_client) -> None:
    client, tenant = quota_client
    ApiKeys(settings.database_url).set_quota(tenant, 100, 10_000)
    lines = [_line(f"p-{i}", max_tokens=13) for i in range(10)]  # 140 tokens: 7 fit in 100
    input_id = _upload(client, lines)
    with running_worker(settings, {"null": NullEngine()}):
        not_near_a_minute_end(settings)
        batch = client.batches.create(
            input_file_id=input_id, endpoint=ENDPOINT, completion_window="24h"
        )
        deadline = time.monotonic() + 30
        while _sent(settings, batch.id) < 7:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2.0)  # three tries more: the minute's window is still full
        assert _sent(settings, batch.id) == 7
        assert quota_used(settings, tenant, "minute") == 7 * LINE_COST
        waiting = client.batches.retrieve(batch.id)
        assert waiting.status == "in_progress" and waiting.request_counts.failed == 0
        # the window's end, brought forward: its counter gone, as at the next minute
        redis.Redis.from_url(settings.broker_url).delete(f"{QUOTA_PREFIX}{tenant}:minute")
        done = _until(client, batch.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (10, 10, 0)
    assert [o["custom_id"] for o in _jsonl(client, done.output_file_id)] == [
        f"p-{i}" for i in range(10)
    ]
    assert quota_used(settings, tenant, "minute") == 3 * LINE_COST  # the rest, in the new one
    assert quota_used(settings, tenant, "day") == 10 * LINE_COST  # each line charged once


def test_a_line_over_the_quota_alone_fails_alone(settings, quota_client) -> None:
    client, tenant = quota_client
    ApiKeys(settings.database_url).set_quota(tenant, None, 50)
    lines = [_line(c, max_tokens=13) for c in ("o-0", "o-1", "o-2")]
    lines.insert(1, _line("big", max_tokens=60))  # 61 tokens: over the day's 50 alone
    input_id = _upload(client, lines)
    with running_worker(settings, {"null": NullEngine()}):
        batch = client.batches.create(
            input_file_id=input_id, endpoint=ENDPOINT, completion_window="24h"
        )
        done = _until(client, batch.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, 3, 1)
    output = _jsonl(client, done.output_file_id)
    assert [o["custom_id"] for o in output] == ["o-0", "o-1", "o-2"]
    [error] = _jsonl(client, done.error_file_id)
    assert error["custom_id"] == "big" and error["response"]["status_code"] == 429
    body = error["response"]["body"]["error"]
    assert (body["code"], body["type"]) == ("rate_limit_exceeded", "tokens")
    assert "Request too large for the quota on tokens per day: limit 50" in body["message"]
    assert quota_used(settings, tenant, "day") == 3 * LINE_COST
    assert quota_used(settings, tenant, "minute") == 0  # no minute quota: no counter
