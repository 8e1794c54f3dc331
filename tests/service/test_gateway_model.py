"""One end-to-end chat through the gateway on the real model (fp32 SmolLM2 in the paged
engine): the official SDK's answer, the same answer streamed, and the prefix cache's hit in
`usage.prompt_tokens_details.cached_tokens`."""

from __future__ import annotations

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
