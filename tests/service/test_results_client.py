"""Producers that need only the broker: `InferqClient` with no database URL at all, and
`AsyncInferqClient` (directly and behind the FastAPI example), on the real Redis, PostgreSQL,
worker and model."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest
from service_helpers import wait_status

import storage.db
from api_client import AsyncInferqClient, InferqClient
from examples.fastapi_app import create_app
from inferq.settings import get_settings

pytestmark = [pytest.mark.model, pytest.mark.services]
LONG = {"prompt": "Count slowly from one to one thousand:", "params": {"max_tokens": 400}}
SHORT = ["What is the capital of France?", "Name a color.", "Say hello."]


def _chat(question: str, max_tokens: int = 8) -> dict:
    chat = [{"role": "user", "content": question}]
    return {"messages": chat, "params": {"max_tokens": max_tokens}}


def _broker_only(service_settings, home: Path):
    """A producer's settings: the broker and the queue, and no database URL at all."""
    settings = get_settings(
        home=home,
        broker_url=service_settings.broker_url,
        queue=service_settings.queue,
        model=service_settings.model,
    )
    assert settings.database_url is None
    return settings


def test_a_producer_with_no_database_url_submits_streams_waits_and_cancels(
    service_settings, fp_worker, tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("INFERQ_DATABASE_URL", raising=False)
    settings = _broker_only(service_settings, tmp_path / "producer")
    client = InferqClient(settings)
    ids = client.submit_many(_chat(q) for q in SHORT)
    streamed = "".join(client.stream(ids[0], timeout=120))
    views = client.wait_many(ids, timeout=120)
    assert [v.status for v in views] == ["done"] * len(ids)
    assert streamed == views[0].result.text and "Paris" in streamed
    assert views[0].metrics.queue_wait_s >= 0 and views[0].attempts == 1
    assert [v.id for v in client.as_completed(ids, timeout=5)] != []  # ended: at once

    long_job = client.submit(**LONG)
    wait_status(client, long_job, "running")
    started = time.monotonic()
    assert client.cancel(long_job) is True
    assert time.monotonic() - started < 2  # by notification, not by a poll
    view = client.wait(long_job, timeout=10)
    assert view.status == "cancelled" and view.result is None
    assert fp_worker.repo.get(long_job).status == "cancelled"  # the record agrees
    # the producer never opened a database, not even the embedded default
    assert settings.resolved_database_url not in storage.db._engines
    assert not (tmp_path / "producer" / "inferq.db").exists()
    client.close()


def test_async_client_submits_waits_streams_and_cancels(service_settings, fp_worker) -> None:
    async def main() -> dict:
        client = AsyncInferqClient(service_settings)
        try:
            ids = await client.submit_many(_chat(q) for q in SHORT)
            order = [view.id async for view in client.as_completed(ids, timeout=120)]
            views = await client.wait_many(ids, timeout=5)
            again = await client.submit(**_chat(SHORT[0]), idempotency_key="q")
            streamed = [d async for d in client.stream(again, timeout=120)]
            long_job = await client.submit(**LONG)
            while (view := await client.get(long_job)) is None or view.status != "running":
                await asyncio.sleep(0.02)
            cancelled = await client.cancel(long_job)
            return {
                "ids": ids,
                "order": order,
                "views": views,
                "again": again,
                "streamed": streamed,
                "view": await client.wait(again),
                "cancelled": cancelled,
                "long": await client.wait(long_job, timeout=10),
            }
        finally:
            await client.aclose()

    got = asyncio.run(main())
    assert sorted(got["order"]) == sorted(got["ids"])
    assert [v.status for v in got["views"]] == ["done"] * len(SHORT)
    assert "".join(got["streamed"]) == got["view"].result.text
    assert got["view"].result.text == got["views"][0].result.text  # greedy: the same text
    assert got["cancelled"] is True and got["long"].status == "cancelled"


def test_the_fastapi_example_serves_jobs(service_settings, fp_worker) -> None:
    async def main() -> dict:
        client = AsyncInferqClient(service_settings)
        transport = httpx.ASGITransport(app=create_app(client))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                done = await http.post("/complete", json={"prompt": SHORT[0], "max_tokens": 8})
                created = await http.post("/jobs", json={"prompt": SHORT[1], "max_tokens": 6})
                job_id = created.json()["job_id"]
                stream = await http.get(f"/jobs/{job_id}/stream")
                result = await http.get(f"/jobs/{job_id}/result", params={"timeout": 60})
                state = await http.get(f"/jobs/{job_id}")
                unknown = await http.get(f"/jobs/{uuid.uuid4()}")
                invalid = await http.post("/jobs", json={"prompt": "hi", "max_tokens": 99999})
                cancel = await http.delete(f"/jobs/{job_id}")
        finally:
            await client.aclose()
        return {
            "done": done,
            "created": created,
            "stream": stream,
            "result": result,
            "state": state,
            "unknown": unknown,
            "invalid": invalid,
            "cancel": cancel,
        }

    got = asyncio.run(main())
    assert got["done"].status_code == 200 and "Paris" in got["done"].json()["text"]
    assert got["created"].status_code == 202
    result = got["result"].json()
    assert result["status"] == "done" and got["stream"].text == result["result"]["text"]
    assert got["state"].json() == result
    assert got["unknown"].status_code == 404
    assert got["invalid"].status_code == 422 and "max_tokens" in got["invalid"].text
    assert got["cancel"].json() == {"cancelled": False}  # it had ended
