"""Batches survive their gateway: one killed (SIGKILL) while writing a batch's request rows,
or between enqueueing a chunk of jobs and noting them as sent, is taken on by the next
gateway's sweep once its lease lapses: every line one job, run once, the output one line per
custom_id, and each line charged to its tenant's token quota once. And a signed tenant's
line whose job no worker took within the signature window is enqueued again, freshly signed,
so the batch completes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import openai
import pytest
import sqlalchemy as sa
from gateway_helpers import new_key, quota_used, serving
from service_helpers import records, running_worker

from inferq.params import MAX_TOKENS
from storage.api_keys import ApiKeys
from worker.engine.null import NullEngine

pytestmark = pytest.mark.services
ENDPOINT = "/v1/chat/completions"
TENANT = "resumer"  # of its own: the database is shared with other gateway tests
SIGNING_KEY = "resumer-signing-key-0123456789"
LINES = 2_500  # three chunks of rows


@pytest.fixture
def settings(service_settings):
    return service_settings.model_copy(
        update={
            "model": "null",
            "tenant_keys": f"{TENANT}={SIGNING_KEY}",
            "gateway_key_cache_s": 0.0,
            "gateway_batch_sweep_s": 0.5,
            "gateway_batch_lease_s": 2.0,
            "gateway_batch_ahead": 600,
        }
    )


def _file(n: int, prefix: str) -> io.BytesIO:
    lines = [
        json.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {"model": "null", "messages": [{"role": "user", "content": str(i)}]},
            }
        )
        for i in range(n)
    ]
    return io.BytesIO(("\n".join(lines) + "\n").encode())


def _killed_gateway(settings, point: str, key: str, tmp_path: Path) -> str:
    """Upload and create a batch through a gateway process that kills itself at `point`;
    the batch's id, once that process is dead."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([".", "tests/service"]),
        "INFERQ_BROKER_URL": settings.broker_url,
        "INFERQ_DATABASE_URL": settings.database_url,
        "INFERQ_QUEUE": settings.queue,
        "INFERQ_HOME": str(settings.home),
        "INFERQ_MODEL": "null",
        "INFERQ_TENANT_KEYS": settings.tenant_keys,
        "INFERQ_GATEWAY_BATCH_LEASE_S": str(settings.gateway_batch_lease_s),
        "INFERQ_GATEWAY_BATCH_AHEAD": str(settings.gateway_batch_ahead),
    }
    root = Path(__file__).parents[2]
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "tests/service/gateway_killed.py", point],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("http"), (tmp_path / "gateway.log").read_text()[-2000:]
        with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:
            upload = client.files.create(file=("in.jsonl", _file(LINES, "r")), purpose="batch")
            try:
                batch_id = client.batches.create(
                    input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
                ).id
            except openai.APIConnectionError:  # killed before it answered
                batch_id = None
        assert proc.wait(timeout=120) == -9  # SIGKILL, at the point
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if batch_id is None:
        with records(settings).engine.connect() as conn:
            found = conn.scalar(
                sa.text("SELECT id FROM api_batches WHERE tenant = :t ORDER BY created_at DESC"),
                {"t": TENANT},
            )
        batch_id = f"batch_{found.hex}"
    return batch_id


def _state(settings, batch_id: str) -> tuple[str, int, int]:
    """The batch's status, its request rows, and those noted as sent."""
    with records(settings).engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT b.status, count(r.line_no), count(r.sent_at) FROM api_batches b"
                " LEFT JOIN api_batch_requests r ON r.batch_id = b.id WHERE b.id = :id"
                " GROUP BY b.status"
            ),
            {"id": uuid.UUID(batch_id.removeprefix("batch_"))},
        ).one()
    return row[0], row[1], row[2]


def _until(client: openai.OpenAI, batch_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.5)
    return batch


def _jobs_of(settings, batch_id: str) -> tuple[int, int, int]:
    """The batch's job rows, their attempts in all, and dead letters of its jobs."""
    name = batch_id
    with records(settings).engine.connect() as conn:
        jobs, attempts = conn.execute(
            sa.text("SELECT count(*), sum(attempts) FROM jobs WHERE idempotency_key LIKE :k"),
            {"k": f"{name}:%"},
        ).one()
        dead = conn.scalar(
            sa.text(
                "SELECT count(*) FROM dead_letters d JOIN api_batch_requests r"
                " ON r.job_id = d.job_id WHERE r.batch_id = :id"
            ),
            {"id": uuid.UUID(batch_id.removeprefix("batch_"))},
        )
    return jobs, attempts, dead


@pytest.mark.parametrize(
    ("point", "killed_at"),
    [("rows:2", ("validating", 2000, 0)), ("sent:1", ("in_progress", LINES, 0))],
)
def test_a_batch_whose_gateway_was_killed_is_resumed_once_per_line(
    settings, tmp_path, point, killed_at
) -> None:
    key = new_key(settings, TENANT)
    batch_id = _killed_gateway(settings, point, key, tmp_path)
    assert _state(settings, batch_id) == killed_at
    with (
        running_worker(settings, {"null": NullEngine()}),
        serving(settings) as url,  # its sweep takes the batch on once the lease lapses
        openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client,
    ):
        done = _until(client, batch_id, timeout=180)
        assert done.status == "completed", done.errors
        counts = done.request_counts
        assert (counts.total, counts.completed, counts.failed) == (LINES, LINES, 0)
        output = client.files.content(done.output_file_id).text.splitlines()
    assert [json.loads(line)["custom_id"] for line in output] == [f"r-{i}" for i in range(LINES)]
    assert _jobs_of(settings, batch_id) == (LINES, LINES, 0)  # one job per line, run once


def test_a_resumed_batch_charges_each_line_once(settings, tmp_path) -> None:
    tenant = f"quota-resumer-{uuid.uuid4().hex[:8]}"  # unsigned: whole chunks; fresh counters
    ApiKeys(settings.database_url).set_quota(tenant, None, 10**9)
    key = new_key(settings, tenant)
    batch_id = _killed_gateway(settings, "sent:2", key, tmp_path)
    assert _state(settings, batch_id) == ("in_progress", LINES, 1000)  # chunk 2 not noted
    with (
        running_worker(settings, {"null": NullEngine()}),
        serving(settings) as url,
        openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client,
    ):
        done = _until(client, batch_id, timeout=180)
    assert done.status == "completed" and done.request_counts.completed == LINES
    assert _jobs_of(settings, batch_id) == (LINES, LINES, 0)
    cost = 1 + min(settings.max_new_tokens, MAX_TOKENS)  # a 1-4 character prompt, no max_tokens
    # chunk 2 was charged and enqueued, not noted as sent: enqueued again, not charged again
    assert quota_used(settings, tenant, "day") == LINES * cost


def test_a_signed_line_not_taken_within_the_window_is_sent_again(settings) -> None:
    tenant = f"signed-{uuid.uuid4().hex[:8]}"  # fresh quota counters
    keys = f"{tenant}={SIGNING_KEY}"
    settings = settings.model_copy(update={"signature_window_s": 2.0, "tenant_keys": keys})
    ApiKeys(settings.database_url).set_quota(tenant, None, 10**9)
    key = new_key(settings, tenant)
    with serving(settings) as url, openai.OpenAI(base_url=url, api_key=key, max_retries=0) as c:
        upload = c.files.create(file=("in.jsonl", _file(10, "s")), purpose="batch")
        batch = c.batches.create(
            input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
        )
        deadline = time.monotonic() + 30
        while _state(settings, batch.id) != ("in_progress", 10, 10):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2.5)  # no worker yet: every queued message is now past the window
        with running_worker(settings, {"null": NullEngine()}):
            done = _until(c, batch.id, timeout=60)
    assert done.status == "completed" and done.request_counts.completed == 10
    jobs, attempts, dead = _jobs_of(settings, batch.id)
    assert (jobs, attempts) == (10, 10)
    assert dead >= 1  # the stale copies were refused; the fresh ones ran
    cost = 1 + min(settings.max_new_tokens, MAX_TOKENS)
    assert quota_used(settings, tenant, "day") == 10 * cost  # sent again: not charged again
