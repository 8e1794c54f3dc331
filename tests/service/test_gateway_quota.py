"""Per-tenant token quotas through the official `openai` SDK: prompt (a quarter of its
characters) plus max output tokens a minute and a day, counted in Redis by one script (all or
nothing, Redis's clock); over it, OpenAI's 429 (`type: tokens`) with `Retry-After`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import openai
import pytest
from gateway_helpers import new_key, not_near_a_minute_end, quota_used, serving
from service_helpers import running_worker

from storage.api_keys import ApiKeys
from worker.engine.null import NullEngine

pytestmark = pytest.mark.services
PROMPT = "abcd" * 4  # 16 characters: 4 tokens by the estimate
COST = 4 + 10  # with max_tokens=10


@pytest.fixture
def settings(service_settings):
    return service_settings.model_copy(
        update={"model": "null", "gateway_key_cache_s": 0.0, "gateway_models_cache_s": 0.0}
    )


@pytest.fixture
def base_url(settings) -> Iterator[str]:
    with running_worker(settings, {"null": NullEngine()}), serving(settings) as url:
        yield url


def test_tokens_a_minute_counted_together_all_or_nothing(settings, base_url) -> None:
    tenant = f"q-{time.monotonic_ns()}"  # counters live in Redis: a tenant of its own
    ApiKeys(settings.database_url).set_quota(tenant, 100, None)
    key = new_key(settings, tenant)
    not_near_a_minute_end(settings)

    async def burst() -> list:
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as aio:
            calls = [
                aio.completions.create(model="null", prompt=PROMPT, max_tokens=10)
                for _ in range(12)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(burst())  # 12 at once: the gateway handles them concurrently
    done = [g for g in got if isinstance(g, openai.types.Completion)]
    refused = [g for g in got if isinstance(g, openai.RateLimitError)]
    assert (len(done), len(refused)) == (100 // COST, 12 - 100 // COST)
    assert quota_used(settings, tenant, "minute") == 7 * COST  # the refused ones count nothing
    err = refused[0]
    assert err.status_code == 429 and err.type == "tokens" and err.code == "rate_limit_exceeded"
    assert 1 <= int(err.response.headers["retry-after"]) <= 60
    assert "tokens per minute: limit 100" in err.message

    other = openai.OpenAI(base_url=base_url, api_key=new_key(settings, "free"), max_retries=0)
    with other:  # another tenant, no quota: unaffected
        assert other.completions.create(model="null", prompt=PROMPT, max_tokens=10).choices
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as caught:  # the cost alone is over
            client.completions.create(model="null", prompt="x", max_tokens=101)
        assert "Request too large" in caught.value.message
        assert "retry-after" not in caught.value.response.headers


def test_tokens_a_day_and_the_cli(settings, base_url, monkeypatch, capsys) -> None:
    from inferq.cli import main

    tenant = f"d-{time.monotonic_ns()}"
    monkeypatch.setenv("INFERQ_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("INFERQ_HOME", str(settings.home))
    assert main(["keys", "create", tenant, "--tpd", str(3 * COST + 1)]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert ApiKeys(settings.database_url).quota(tenant) == (None, 3 * COST + 1)
    messages = [{"role": "user", "content": PROMPT}]
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        for _ in range(3):
            client.chat.completions.create(model="null", messages=messages, max_tokens=10)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="null", messages=messages, max_tokens=10)
        assert "tokens per day" in caught.value.message
        assert 1 <= int(caught.value.response.headers["retry-after"]) <= 86_400
        assert quota_used(settings, tenant, "day") == 3 * COST
        assert main(["keys", "quota", tenant]) == 0  # none given: no quota
        assert "no token quota" in capsys.readouterr().out
        client.chat.completions.create(model="null", messages=messages, max_tokens=10)
    assert main(["keys", "quota", tenant, "--tpm", "0"]) == 2
