"""The Batch API: `POST /v1/batches` (an uploaded JSONL file of `{custom_id, method, url,
body}` lines), `GET /v1/batches[/{id}]`, `POST /v1/batches/{id}/cancel`.

A batch is a row in `api_batches`; each line becomes an ordinary job of the caller's tenant
(its id derived from the batch and the line, so enqueueing again is the same job) recorded in
`api_batch_requests` beside its `custom_id`. Validation and enqueueing run in the gateway that
took the batch, a chunk of lines at a time; the lifecycle is then read from the jobs' records
by whichever replica is asked: in_progress until every job has ended, then completed (or
cancelled, or expired past the completion window), with the output and error files."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from api_client import AsyncInferqClient, InvalidJobError
from gateway.deps import Caller, gateway_of
from gateway.errors import ApiError, from_errors, invalid, job_refused, row_id
from gateway.files import file_id_of, file_name
from gateway.schema import ChatRequest, CompletionRequest
from gateway.state import Gateway
from inferq.logs import get_logger

router = APIRouter()
log = get_logger("inferq.gateway")
WINDOWS = {"24h": timedelta(hours=24)}
REQUESTS = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}
MAX_STRUCTURE_ERRORS = 100
STAMPS = (
    "created",
    "in_progress",
    "expires",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)
RUNNING = ("validating", "in_progress", "cancelling", "finalizing")


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: dict[StrictStr, StrictStr] | None = Field(None, max_length=16)


def batch_name(batch_id: uuid.UUID) -> str:
    return f"batch_{batch_id.hex}"


def batch_id_of(name: str) -> uuid.UUID:
    return row_id(name, "batch_", "batch", "batch_id")


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


async def batch_object(gateway: Gateway, row: dict[str, Any]) -> dict[str, Any]:
    counts = await asyncio.to_thread(gateway.store.counts, row["id"])
    files = {k: file_name(row[k]) if row[k] else None for k in ("output_file_id", "error_file_id")}
    return {
        "id": batch_name(row["id"]),
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": row["errors"],
        "input_file_id": file_name(row["input_file_id"]),
        "completion_window": row["completion_window"],
        "status": row["status"],
        **files,
        **{f"{s}_at": _ts(row[f"{s}_at"]) for s in STAMPS},
        "request_counts": {
            "total": max(row["total"], counts.total),
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "metadata": row["metadata"],
    }


@router.post("/v1/batches")
async def create_batch(caller: Caller, body: BatchCreate, request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    if body.endpoint not in REQUESTS:
        raise invalid(f"endpoint: one of {', '.join(REQUESTS)}", param="endpoint")
    if body.completion_window not in WINDOWS:
        raise invalid(f"completion_window: one of {', '.join(WINDOWS)}", param="completion_window")
    source = await asyncio.to_thread(
        gateway.store.file, caller.tenant, file_id_of(body.input_file_id)
    )
    if source is None or source["purpose"] != "batch":
        raise ApiError(404, f"No batch input file {body.input_file_id}", param="input_file_id")
    batch_id = await asyncio.to_thread(
        gateway.store.create_batch,
        tenant=caller.tenant,
        endpoint=body.endpoint,
        input_file_id=source["id"],
        completion_window=body.completion_window,
        total=source["lines"],
        metadata=body.metadata,
        expires_at=datetime.now(UTC) + WINDOWS[body.completion_window],
    )
    gateway.background(
        _enqueue(gateway, gateway.client_for(caller.tenant), batch_id, caller.tenant)
    )
    return await _read(gateway, caller.tenant, batch_id)


@router.get("/v1/batches")
async def list_batches(caller: Caller, request: Request, limit: int = 20) -> dict[str, Any]:
    gateway = gateway_of(request)
    rows = await asyncio.to_thread(gateway.store.batches, caller.tenant, max(1, min(limit, 100)))
    data = [await _read(gateway, caller.tenant, row["id"]) for row in rows]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/v1/batches/{name}")
async def get_batch(caller: Caller, name: str, request: Request) -> dict[str, Any]:
    return await _read(gateway_of(request), caller.tenant, batch_id_of(name))


@router.post("/v1/batches/{name}/cancel")
async def cancel_batch(caller: Caller, name: str, request: Request) -> dict[str, Any]:
    gateway, batch_id = gateway_of(request), batch_id_of(name)
    await _row(gateway, caller.tenant, batch_id)
    store = gateway.store
    if await asyncio.to_thread(store.move, batch_id, ["validating", "in_progress"], "cancelling"):
        gateway.background(_cancel_jobs(gateway.client_for(caller.tenant), gateway, batch_id))
    return await _read(gateway, caller.tenant, batch_id)


async def _row(gateway: Gateway, tenant: str, batch_id: uuid.UUID) -> dict[str, Any]:
    row = await asyncio.to_thread(gateway.store.batch, tenant, batch_id)
    if row is None:
        raise ApiError(404, f"No such batch: {batch_name(batch_id)}", param="batch_id")
    return row


async def _read(gateway: Gateway, tenant: str, batch_id: uuid.UUID) -> dict[str, Any]:
    """The batch, moved on first where its jobs say it has ended (or its window has)."""
    row = await _row(gateway, tenant, batch_id)
    if row["status"] in ("in_progress", "cancelling"):
        counts = await asyncio.to_thread(gateway.store.counts, batch_id)
        late = datetime.now(UTC) > row["expires_at"]
        if counts.pending == 0 or late:
            end = (
                "cancelled"
                if row["status"] == "cancelling"
                else "expired"
                if late
                else ("completed")
            )
            await asyncio.to_thread(_finalize, gateway, row, end, counts.completed, counts.failed)
            row = await _row(gateway, tenant, batch_id)
    return await batch_object(gateway, row)


def _finalize(gateway: Gateway, row: dict[str, Any], end: str, ok: int, failed: int) -> None:
    """finalizing, then the end state with its files (one replica wins each step)."""
    store, batch_id = gateway.store, row["id"]
    if not store.move(batch_id, [row["status"]], "finalizing"):
        return
    files = {}
    if ok:
        files["output_file_id"] = store.output_file(batch_id, row["tenant"], "output")
    if failed or end != "completed":
        files["error_file_id"] = store.output_file(batch_id, row["tenant"], "error")
    store.move(batch_id, ["finalizing"], end, **files)


async def _enqueue(
    gateway: Gateway, client: AsyncInferqClient, batch_id: uuid.UUID, tenant: str
) -> None:
    """Validate every line, then make each a job, a chunk at a time."""
    store = gateway.store
    row = await _row(gateway, tenant, batch_id)
    try:
        errors = await asyncio.to_thread(_structure_errors, gateway, row)
        if errors:
            failure = {"object": "list", "data": errors}
            await asyncio.to_thread(store.move, batch_id, ["validating"], "failed", errors=failure)
            return
        chunks = store.lines(row["input_file_id"])
        sentinel: Any = object()
        while (chunk := await asyncio.to_thread(next, chunks, sentinel)) is not sentinel:
            if (await _row(gateway, tenant, batch_id))["status"] != "validating":
                break  # cancelled meanwhile
            requests, jobs = _jobs(gateway, client, row, chunk)
            await asyncio.to_thread(store.add_requests, batch_id, requests)
            await asyncio.to_thread(lambda jobs=jobs: [client.enqueue(job) for job in jobs])
        if not await asyncio.to_thread(store.move, batch_id, ["validating"], "in_progress"):
            await _cancel_jobs(client, gateway, batch_id)  # cancelled while enqueueing
    except Exception as exc:
        log.error("gateway.batch_failed", batch=str(batch_id), error=type(exc).__name__)
        failure = {
            "object": "list",
            "data": [
                {"code": "internal_error", "message": str(exc)[:500], "param": None, "line": None}
            ],
        }
        await asyncio.to_thread(store.move, batch_id, ["validating"], "failed", errors=failure)


def _structure_errors(gateway: Gateway, row: dict[str, Any]) -> list[dict[str, Any]]:
    """What fails the whole batch, as OpenAI's validation does: a line that is not a JSON
    request for the batch's endpoint, or a repeated custom_id."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for chunk in gateway.store.lines(row["input_file_id"]):
        for line_no, text in chunk:
            problem = _structure(text, row["endpoint"], seen)
            if problem:
                errors.append(
                    {"code": "invalid_request", "message": problem, "param": None, "line": line_no}
                )
                if len(errors) >= MAX_STRUCTURE_ERRORS:
                    return errors
    if not seen and not errors:
        errors.append(
            {
                "code": "empty_file",
                "message": "the input file has no requests",
                "param": None,
                "line": None,
            }
        )
    return errors


def _structure(text: str, endpoint: str, seen: set[str]) -> str | None:
    try:
        item = json.loads(text)
    except ValueError:
        return "not a JSON object"
    if not isinstance(item, dict) or not isinstance(item.get("body"), dict):
        return "a line is {custom_id, method, url, body} with body an object"
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= 512:
        return "custom_id: a string of 1 to 512 characters"
    if custom_id in seen:
        return f"custom_id {custom_id!r} is repeated"
    seen.add(custom_id)
    if item.get("method") != "POST" or item.get("url") != endpoint:
        return f"method and url: POST {endpoint} (the batch's endpoint)"
    return None


def _jobs(
    gateway: Gateway, client: AsyncInferqClient, row: dict[str, Any], chunk: list
) -> tuple[list[dict[str, Any]], list]:
    """The chunk's request rows and the jobs to send (a line the request or wire schema
    refuses gets its error instead: it goes to the error file)."""
    left = (row["expires_at"] - datetime.now(UTC)).total_seconds()
    kind, requests, jobs = REQUESTS[row["endpoint"]], [], []
    for line_no, text in chunk:
        item = json.loads(text)
        entry: dict[str, Any] = {
            "line_no": line_no,
            "custom_id": item["custom_id"],
            "job_id": None,
            "error": None,
        }
        try:
            request = kind.model_validate(item["body"])
            if request.stream:
                raise invalid("stream: not supported in a batch", param="stream")
            fields = {**request.job_fields(gateway.default_max_tokens), "ttl_s": max(left, 1)}
            job = client.build(**fields, idempotency_key=f"{batch_name(row['id'])}:{line_no}")
        except ValidationError as exc:
            entry["error"] = json.dumps(from_errors(exc.errors()).body())
        except InvalidJobError as exc:
            entry["error"] = json.dumps(job_refused(str(exc)).body())
        except ApiError as exc:
            entry["error"] = json.dumps(exc.body())
        else:
            entry["job_id"] = job.job_id
            jobs.append(job)
        requests.append(entry)
    return requests, jobs


async def _cancel_jobs(client: AsyncInferqClient, gateway: Gateway, batch_id: uuid.UUID) -> None:
    """Ask the workers to cancel every job of the batch that has not ended."""
    for job_id in await asyncio.to_thread(gateway.store.unended_jobs, batch_id):
        await client.cancel(job_id, wait=0)
