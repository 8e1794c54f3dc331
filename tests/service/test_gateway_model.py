"""One end-to-end chat through the gateway on the real model (fp32 SmolLM2 in the paged
engine): the official SDK's answer, the same answer streamed, and the prefix cache's hit in
`usage.prompt_tokens_details.cached_tokens`."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest
from gateway_helpers import new_key, serving

from inferq.settings import FP_MODEL

pytestmark = [pytest.mark.model, pytest.mark.services]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_chat_through_the_gateway_on_the_real_model(service_settings, fp_worker) -> None:
    with serving(service_settings) as url:
        client = openai.OpenAI(base_url=url, api_key=new_key(service_settings, "e2e"))
        ask = {"model": FP_MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
        done = client.chat.completions.create(**ask)
        chunks = list(
            client.chat.completions.create(
                **ask, stream=True, stream_options={"include_usage": True}
            )
        )
        client.close()
    answer = done.choices[0].message.content
    assert "Paris" in answer
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer  # greedy: the same text, delta by delta
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    usage = chunks[-1].usage
    assert usage.prompt_tokens == done.usage.prompt_tokens
    assert usage.completion_tokens == done.usage.completion_tokens
    assert done.usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens_details.cached_tokens >= 16  # the first asking's blocks, reused


def test_a_stream_whose_client_goes_away_cancels_its_job(service_settings, fp_worker) -> None:
    key = new_key(service_settings, "leaver")
    ask = {
        "model": FP_MODEL,
        "prompt": "Count slowly from one to one thousand:",
        "max_tokens": 400,
        "stream": True,
    }
    with serving(service_settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        with http.stream(
            "POST", "/completions", json=ask, headers={"Authorization": f"Bearer {key}"}
        ) as answer:
            job_id = uuid.UUID(answer.headers["x-inferq-job-id"])
            lines = answer.iter_lines()
            while '"text":""' in (line := next(lines)) or not line:
                pass  # until the first piece of text
        deadline = time.monotonic() + 30
        while (view := fp_worker.repo.get(job_id)).status != "cancelled":
            assert time.monotonic() < deadline, f"job still {view.status}"
            time.sleep(0.1)
    assert view.result is None
