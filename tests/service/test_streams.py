"""Token streaming through the queue, on the real Redis, PostgreSQL, worker and model: every
job of a batch streams deltas that join to its stored text (stop strings included; and on
the service benchmark's workload), a reader that comes late gets the text so far, and with
streaming off a reader still gets the text."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
import redis
from service_helpers import running_worker, wait_status

from api_client import AsyncInferqClient, InferqClient
from api_client.results import stream_key

pytestmark = [pytest.mark.model, pytest.mark.services]
BENCH = Path(__file__).resolve().parents[2] / "bench"
QUESTIONS = [
    ("What is the capital of France?", ()),
    ("Name three colors.", (",",)),
    ("Write a haiku about the sea.", ("\n",)),
    ("Count from one to ten.", ("five",)),
    ("Explain what a prime number is.", (".",)),
    ("Say hello in French.", ()),
    ("List two fruits and two vegetables.", (" and",)),
    ("What is 2 plus 2?", ()),
    ("Describe a cat in one sentence.", ()),
    ("Give me a word that rhymes with 'light'.", ("ight",)),
    ("What color is the sky?", ()),
    ("Tell me a fun fact about octopuses.", ("!", "?")),
]


def _job(question: str, stop: tuple[str, ...], max_tokens: int = 40) -> dict:
    return {
        "messages": [{"role": "user", "content": question}],
        "params": {"max_tokens": max_tokens, "stop": list(stop)},
    }


def test_every_jobs_streamed_deltas_join_to_its_stored_text(service_settings, fp_worker) -> None:
    async def main() -> tuple[list, list]:
        client = AsyncInferqClient(service_settings)
        try:
            ids = await client.submit_many(_job(q, stop) for q, stop in QUESTIONS)

            async def read(job_id) -> list[str]:
                return [d async for d in client.stream(job_id, timeout=300)]

            streamed = await asyncio.gather(*(read(i) for i in ids))
            return streamed, await client.wait_many(ids, timeout=60)
        finally:
            await client.aclose()

    streamed, views = asyncio.run(main())
    r = redis.Redis.from_url(service_settings.broker_url)
    assert [v.status for v in views] == ["done"] * len(QUESTIONS)
    for deltas, view, (_, stop) in zip(streamed, views, QUESTIONS, strict=True):
        assert "".join(deltas) == view.result.text, (deltas, view.result.text)
        assert not any(s in view.result.text for s in stop)  # cut before the stop string
        entries = r.xrange(stream_key(view.id))
        assert "".join(e[b"d"].decode() for _, e in entries) == view.result.text
        assert entries[-1][1][b"end"] in (b"stop", b"length")
        assert len(entries) <= view.result.completion_tokens + 1  # at most one per step
        assert 0 < r.ttl(stream_key(view.id)) <= service_settings.stream_expires_s
    assert sum(len(d) > 1 for d in streamed) >= len(QUESTIONS) // 2  # streamed, in pieces


def test_a_late_reader_gets_the_text_so_far_then_the_rest(service_settings, fp_worker) -> None:
    client = InferqClient(service_settings)
    job = client.submit("Count slowly from one to one thousand:", params={"max_tokens": 120})
    wait_status(client, job, "running")
    r = redis.Redis.from_url(service_settings.broker_url)
    deadline = time.monotonic() + 60
    while r.xlen(stream_key(job)) < 10:  # well into the job
        assert time.monotonic() < deadline and client.get(job).status == "running"
        time.sleep(0.01)
    so_far = "".join(e[b"d"].decode() for _, e in r.xrange(stream_key(job)))
    deltas = list(client.stream(job, timeout=120))
    view = client.wait(job, timeout=10)
    assert "".join(deltas) == view.result.text
    assert so_far and deltas[0].startswith(so_far)  # the text so far came first, at once


def test_with_streaming_off_a_reader_still_gets_the_text(service_settings, paged_engine) -> None:
    settings = service_settings.model_copy(update={"stream": False, "result_poll_s": 0.2})
    client = InferqClient(settings)
    with running_worker(settings, {paged_engine.model_name: paged_engine}):
        job = client.submit(**_job(*QUESTIONS[0]))
        deltas = list(client.stream(job, timeout=120))
        view = client.wait(job, timeout=10)
    assert "".join(deltas) == view.result.text and "Paris" in view.result.text
    assert redis.Redis.from_url(settings.broker_url).exists(stream_key(job)) == 0


def test_on_the_service_benchmark_workload_every_stream_joins_to_the_stored_text(
    service_settings, fp_worker, model_path
) -> None:
    """bench/service_bench.py's jobs (fewer, shorter), read as it reads them with streaming on:
    every job's stream at once while they run, then compared with the stored texts."""
    sys.path[:0] = [str(BENCH), str(BENCH / "peers")]
    from engine_bench import build_workload
    from service_bench import RecordingCodec, StreamReaders
    from transformers import AutoTokenizer

    from worker.engine.codec import TextCodec

    codec = RecordingCodec(TextCodec.from_model_dir(model_path))
    jobs, _ = build_workload(AutoTokenizer.from_pretrained(model_path), codec, 16, 0, 48)
    client = InferqClient(service_settings)
    ids = client.submit_many(
        {"messages": codec.messages[id(j.prompt_ids)], "params": {"max_tokens": j.max_tokens}}
        for j in jobs
    )
    streamed = StreamReaders(AsyncInferqClient(service_settings), ids).texts()
    views = client.wait_many(ids, timeout=60)
    assert [v.status for v in views] == ["done"] * len(jobs)
    assert streamed == {v.id: v.result.text for v in views}
    r = redis.Redis.from_url(service_settings.broker_url)
    for view in views:  # the stream itself says it all (not the reader's fallback to the result)
        entries = r.xrange(stream_key(view.id))
        assert "".join(e[b"d"].decode() for _, e in entries if b"d" in e) == view.result.text
        assert entries[-1][1][b"end"] in (b"stop", b"length")
    client.close()
