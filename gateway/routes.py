"""`POST /v1/chat/completions` and `/v1/completions` (whole answers and server-sent event
streams), `GET /v1/models`, `GET /healthz`. A request is a job like any other: enqueued as
its tenant through `AsyncInferqClient`, answered from the results path (the job's result key
and its notification; a stream from the job's Redis stream), its id in `x-inferq-job-id`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from celery.exceptions import TaskRevokedError
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api_client import AsyncInferqClient, InvalidJobError, JobExpired, JobFailed
from gateway.deps import Caller, gateway_of
from gateway.errors import ApiError, invalid, job_refused
from gateway.quota import token_cost
from gateway.responses import DONE, Answer, Kind, model_object, sse
from gateway.schema import ChatRequest, CompletionRequest
from storage.api_keys import TenantKey
from storage.records import JobStatus, JobView

JOB_HEADER = "x-inferq-job-id"
# What a worker refuses a job for that the request itself caused (worker/service/intake.py,
# `_admission_error`): a 400, not a server error.
REQUEST_FAULTS = ("prompt has ", "prompt (", "prompt is empty", "max_tokens ")
router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(caller: Caller, body: ChatRequest, request: Request) -> Response:
    return await _answer(request, caller, body, "chat")


@router.post("/v1/completions")
async def completions(caller: Caller, body: CompletionRequest, request: Request) -> Response:
    return await _answer(request, caller, body, "text")


@router.get("/v1/models")
async def list_models(caller: Caller, request: Request) -> dict:
    names = sorted(await gateway_of(request).models())
    return {"object": "list", "data": [model_object(name) for name in names]}


@router.get("/v1/models/{name:path}")
async def get_model(caller: Caller, name: str, request: Request) -> dict:
    if name not in await gateway_of(request).models():
        raise ApiError(
            404,
            f"The model '{name}' does not exist or no worker serves it.",
            code="model_not_found",
            param="model",
        )
    return model_object(name)


@router.get("/healthz")
async def healthz(request: Request) -> Response:
    """200 while Redis (the queue and results) and PostgreSQL (keys, workers) answer."""
    gateway = gateway_of(request)
    try:
        await gateway.client.redis.ping()
        await gateway.models()
    except Exception as exc:  # any failure of either is "not healthy"
        return JSONResponse({"status": "unavailable", "error": type(exc).__name__}, 503)
    return JSONResponse({"status": "ok"})


async def _answer(
    request: Request, caller: TenantKey, body: ChatRequest | CompletionRequest, kind: Kind
) -> Response:
    gateway = gateway_of(request)
    fields = body.job_fields(gateway.default_max_tokens)
    respond_async = "respond-async" in request.headers.get("prefer", "")
    if respond_async and body.stream:
        raise invalid("stream: not with Prefer: respond-async", param="stream")
    await gateway.require_model(body.model)
    client = gateway.client_for(caller.tenant)
    try:
        job = client.build(**fields, idempotency_key=request.headers.get("idempotency-key"))
    except InvalidJobError as exc:
        raise job_refused(str(exc)) from None
    await gateway.quotas.charge(caller, token_cost(fields))
    job_id = await client.send(job)
    answer = Answer(kind, job_id, body.model)
    headers = {JOB_HEADER: str(job_id)}
    if respond_async:
        return JSONResponse(answer.queued(), status_code=202, headers=headers)
    timeout = gateway.settings.gateway_timeout_s
    if body.stream:
        events = _events(client, answer, body.include_usage, timeout)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    view = await _ended(client, job_id, timeout)
    assert view.result is not None
    return JSONResponse(answer.complete(view.result), headers=headers)


async def _ended(client: AsyncInferqClient, job_id: uuid.UUID, timeout: float) -> JobView:
    """The job's view once done; its failure as an error otherwise."""
    try:
        view = await client.wait(job_id, timeout=timeout)
    except TimeoutError:
        raise ApiError(
            504, f"job {job_id} has not finished after {timeout:g} s", code="timeout"
        ) from None
    if view.status == JobStatus.DONE and view.result is not None:
        return view
    raise _job_error(view.status, view.error or view.status)


def _job_error(status: str, reason: str) -> ApiError:
    if status == JobStatus.EXPIRED:
        return ApiError(504, f"job expired: {reason}", code="job_expired")
    if status == JobStatus.CANCELLED:
        return ApiError(409, "job cancelled", code="job_cancelled", type_="invalid_request_error")
    if reason.startswith(REQUEST_FAULTS):
        return invalid(reason, code="context_length_exceeded" if "prompt" in reason else None)
    return ApiError(500, f"job failed: {reason}", code="job_failed")


_cancels: set[asyncio.Task] = set()  # cancels of streams whose clients went away, in flight


async def _events(
    client: AsyncInferqClient, answer: Answer, include_usage: bool, timeout: float
) -> AsyncIterator[bytes]:
    """The job's text as OpenAI's stream chunks, then its finish reason (and usage), then
    `[DONE]`; a job that fails sends an error event. A client that goes away cancels it."""
    try:
        yield answer.first_chunk(with_usage=include_usage)
        async for delta in client.stream(answer.job_id, timeout=timeout):
            if delta:
                yield answer.chunk(delta, with_usage=include_usage)
        view = await _ended(client, answer.job_id, timeout)
        assert view.result is not None
        yield answer.chunk(None, view.result.finish_reason, with_usage=include_usage)
        if include_usage:
            yield answer.usage_chunk(view.result)
    except (JobFailed, TaskRevokedError, TimeoutError, ApiError) as exc:
        yield sse(_stream_error(exc).body())
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: so does its job
        task = asyncio.get_running_loop().create_task(client.cancel(answer.job_id, wait=0))
        _cancels.add(task)
        task.add_done_callback(_cancels.discard)
        raise
    yield DONE


def _stream_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TaskRevokedError):
        return _job_error(JobStatus.CANCELLED, "cancelled")
    if isinstance(exc, TimeoutError):
        return ApiError(504, str(exc), code="timeout")
    status = JobStatus.EXPIRED if isinstance(exc, JobExpired) else JobStatus.FAILED
    return _job_error(status, str(exc.args[0]) if exc.args else status)
