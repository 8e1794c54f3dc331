"""The gateway driven by the official `openai` SDK (sync, async, streaming) against a real
worker on the null engine, the real Redis and PostgreSQL: shapes, job ids, usage, errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
import sqlalchemy as sa
from gateway_helpers import new_key, serving
from service_helpers import records, running_worker

from worker.engine.null import NullEngine

pytestmark = pytest.mark.services
ACME_SIGNING_KEY = "acme-signing-key-0123456789"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture
def settings(service_settings):
    return service_settings.model_copy(
        update={
            "model": "null",
            "tenant_keys": f"acme={ACME_SIGNING_KEY}",
            "gateway_key_cache_s": 0.0,
            "gateway_models_cache_s": 0.0,
        }
    )


@pytest.fixture
def base_url(settings) -> Iterator[str]:
    with running_worker(settings, {"null": NullEngine()}), serving(settings) as url:
        yield url


@pytest.fixture
def client(settings, base_url) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key=new_key(settings, "acme"), max_retries=0) as c:
        yield c


def _job(settings, job_id: str) -> sa.Row:
    with records(settings).engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT j.tenant, j.priority, j.expires_at, j.params, m.completion_tokens"
                " FROM jobs j JOIN job_metrics m ON m.job_id = j.id WHERE j.id = :id"
            ),
            {"id": uuid.UUID(job_id)},
        ).one()


def test_chat_completion_is_a_signed_job_of_the_keys_tenant(settings, client) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="null",
        messages=CHAT,
        max_completion_tokens=5,
        temperature=0,
        seed=7,
        stop=["\n\n"],
        user="u-1",
        metadata={"order": "42"},
        extra_body={"priority": 7, "ttl_s": 60},
    )
    job_id = raw.headers["x-inferq-job-id"]
    done = raw.parse()
    assert done.id == f"chatcmpl-{uuid.UUID(job_id).hex}" and done.object == "chat.completion"
    assert done.model == "null" and len(done.choices) == 1
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert done.usage.completion_tokens == 5
    prompt = len(b"Be brief.\nHi there")  # the null engine's tokens are the bytes
    assert done.usage.prompt_tokens == prompt and done.usage.total_tokens == prompt + 5
    assert done.usage.prompt_tokens_details.cached_tokens == 0
    row = _job(settings, job_id)  # a job like any other: in jobs and job_metrics
    assert (row.tenant, row.priority, row.completion_tokens) == ("acme", 7, 5)
    assert row.expires_at is not None
    assert row.params == {
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 7,
        "stop": ["\n\n"],
    }


def test_completions_default_max_tokens_and_idempotency(settings, client) -> None:
    first = client.completions.with_raw_response.create(
        model="null", prompt="Once upon", extra_headers={"Idempotency-Key": "k-1"}
    )
    again = client.completions.with_raw_response.create(
        model="null", prompt="Once upon", extra_headers={"Idempotency-Key": "k-1"}
    )
    assert first.headers["x-inferq-job-id"] == again.headers["x-inferq-job-id"]
    done = first.parse()
    assert done.object == "text_completion" and done.choices[0].text == ""
    assert done.usage.completion_tokens == 16  # OpenAI's default for completions
    with records(settings).engine.connect() as conn:
        n = conn.scalar(sa.text("SELECT count(*) FROM jobs WHERE idempotency_key = 'k-1'"))
    assert n == 1


def test_stream_with_usage_sync_and_async(settings, base_url, client) -> None:
    chunks = list(
        client.chat.completions.create(
            model="null",
            messages=CHAT,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    async def main() -> list:
        key = new_key(settings, "beta")  # a tenant without a signing key
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as aio:
            done = await aio.chat.completions.create(model="null", messages=CHAT, max_tokens=2)
            stream = await aio.completions.create(
                model="null", prompt="x", max_tokens=2, stream=True
            )
            return [done, [c async for c in stream]]

    done, streamed = asyncio.run(main())
    assert done.usage.completion_tokens == 2
    assert streamed[-1].choices[0].finish_reason == "length" and streamed[-1].usage is None
    assert _job(settings, uuid.UUID(done.id.split("-", 1)[1]).hex).tenant == "beta"


def test_models_and_health(base_url, client) -> None:
    assert [m.id for m in client.models.list()] == ["null"]
    assert client.models.retrieve("null").owned_by == "inferq"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    health = httpx.get(base_url.removesuffix("/v1") + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_errors_in_openais_shape(settings, base_url, client) -> None:
    def refused(kind, **request):
        with pytest.raises(kind) as caught:
            client.chat.completions.create(**{"model": "null", "messages": CHAT, **request})
        return caught.value

    err = refused(openai.BadRequestError, n=2)
    assert err.status_code == 400 and err.param == "n" and err.type == "invalid_request_error"
    assert (
        refused(
            openai.BadRequestError, tools=[{"type": "function", "function": {"name": "f"}}]
        ).code
        == "unsupported_parameter"
    )
    assert refused(openai.BadRequestError, extra_body={"nonsense": 1}).param == "nonsense"
    assert refused(openai.BadRequestError, max_tokens=5000).param == "max_tokens"
    assert refused(openai.BadRequestError, messages=[{"role": "tool", "content": "x"}])
    assert refused(openai.BadRequestError, stop=["a"] * 9).param == "stop"
    assert refused(openai.InternalServerError, model="gpt-4o").status_code == 503
    huge = "x" * (settings.gateway_max_body_bytes + 1)
    err = refused(openai.APIStatusError, messages=[{"role": "user", "content": huge}])
    assert err.status_code == 413 and err.body["code"] == "request_too_large"
    bad = openai.OpenAI(base_url=base_url, api_key="iq-not-a-key", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    answer = httpx.post(base_url + "/chat/completions", json={"model": "null"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"


def test_rate_limit_and_revocation(settings, base_url) -> None:
    from storage.api_keys import ApiKeys

    keys = ApiKeys(settings.database_url)
    key_id, key = keys.create("acme", rate_limit_rpm=2)
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as limited:
        limited.models.list()
        limited.models.list()
        with pytest.raises(openai.RateLimitError) as caught:
            limited.models.list()
        retry_after = int(caught.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 60
        assert keys.revoke(key_id) and not keys.revoke(key_id)
        with pytest.raises(openai.AuthenticationError):  # the cache is off in these tests
            limited.models.list()


def test_keys_cli_prints_the_key_alone_last_and_stores_only_its_hash(
    settings, monkeypatch, capsys
) -> None:
    from inferq.cli import main
    from storage.api_keys import ApiKeys

    monkeypatch.setenv("INFERQ_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("INFERQ_HOME", str(settings.home))
    assert main(["keys", "create", "cli-tenant", "--rpm", "5"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    keys = ApiKeys(settings.database_url)
    found = keys.lookup(key)
    assert found is not None and (found.tenant, found.rate_limit_rpm) == ("cli-tenant", 5)
    assert main(["keys", "list", "cli-tenant"]) == 0
    listed = capsys.readouterr().out
    assert str(found.id) in listed and key not in listed and key[:10] in listed
    with records(settings).engine.connect() as conn:  # the table holds no key
        stored = conn.execute(
            sa.text("SELECT * FROM api_keys WHERE id = :id"), {"id": found.id}
        ).one()
    assert key not in [str(v) for v in stored]
    assert main(["keys", "revoke", str(found.id)]) == 0 and keys.lookup(key) is None
    assert main(["keys", "revoke", str(found.id)]) == 1
    assert main(["keys", "create", "not a tenant!"]) == 2


def test_concurrent_waits_share_one_subscription(settings, base_url) -> None:
    """The gateway's waits (every request's) hold one Redis connection between them."""
    import redis

    from api_client import AsyncInferqClient

    admin = redis.Redis.from_url(settings.broker_url)

    def subscribers() -> int:
        return len(admin.client_list(_type="pubsub"))

    before = subscribers()

    async def main() -> tuple[int, list]:
        client = AsyncInferqClient(settings.model_copy(update={"result_poll_s": 30.0}))
        never = [uuid.uuid4() for _ in range(30)]  # no such jobs: they wait out their time
        waits = [asyncio.create_task(client.wait(j, timeout=1.5)) for j in never]
        await asyncio.sleep(0.5)
        during = subscribers()
        done = await asyncio.gather(*waits, return_exceptions=True)
        job = await client.submit("hi", model="null", params={"max_tokens": 2})
        started = time.monotonic()
        ended = await client.wait(job, timeout=30)
        assert time.monotonic() - started < 5  # woken by the notification, not a re-read
        await client.aclose()
        return during, [*done, ended]

    during, outcomes = asyncio.run(main())
    assert during == before + 1
    assert all(isinstance(o, TimeoutError) for o in outcomes[:-1])
    assert outcomes[-1].status == "done"
    assert subscribers() == before


def test_hostile_requests_get_clear_errors(settings, base_url, client) -> None:
    """A body nested past the parser's depth, a key with non-ASCII characters, and another
    tenant's batch and file ids: each a clear error in OpenAI's shape, never a 500."""
    key = client.api_key
    auth = {"Authorization": f"Bearer {key}"}
    nested = '{"model": "null", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    answer = httpx.post(
        base_url + "/chat/completions",
        content=nested,
        headers={**auth, "Content-Type": "application/json"},
    )
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    answer = httpx.get(
        base_url + "/models", headers={"Authorization": "Bearer clé-ünïcödé".encode()}
    )
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    owner = openai.OpenAI(base_url=base_url, api_key=new_key(settings, "victim"), max_retries=0)
    upload = owner.files.create(
        file=(
            "in.jsonl",
            b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": {"model": "null", "messages": [{"role": "user", "content": "Hi"}]}}\n',
        ),
        purpose="batch",
    )
    batch = owner.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    other = openai.OpenAI(base_url=base_url, api_key=new_key(settings, "mallory"), max_retries=0)
    with other:
        for read in (
            lambda: other.batches.retrieve(batch.id),
            lambda: other.batches.cancel(batch.id),
            lambda: other.files.content(upload.id),
        ):
            with pytest.raises(openai.NotFoundError):
                read()
    assert owner.batches.retrieve(batch.id).id == batch.id  # the owner still sees it
    owner.close()


def test_respond_async_enqueues_without_waiting(settings, base_url, client) -> None:
    """`Prefer: respond-async`: 202 with the job id at once; the job runs as any other and
    its result is read by id (here with the tenant's own client)."""
    from api_client import InferqClient

    headers = {"Authorization": f"Bearer {client.api_key}", "Prefer": "respond-async"}
    request = {"model": "null", "messages": CHAT, "max_tokens": 3}
    answer = httpx.post(base_url + "/chat/completions", json=request, headers=headers)
    assert answer.status_code == 202
    body = answer.json()
    job_id = answer.headers["x-inferq-job-id"]
    assert body["job_id"] == job_id and body["object"] == "inferq.job"
    assert body["id"] == f"chatcmpl-{uuid.UUID(job_id).hex}" and body["status"] == "queued"
    own = InferqClient(settings, tenant="acme", key=ACME_SIGNING_KEY)
    try:
        view = own.wait(job_id, timeout=30)
    finally:
        own.close()
    assert view.status == "done" and view.result.completion_tokens == 3
    streamed = httpx.post(
        base_url + "/chat/completions", json={**request, "stream": True}, headers=headers
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
