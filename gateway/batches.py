"""The Batch API: `POST /v1/batches` (an uploaded JSONL file of `{custom_id, method, url,
body}` lines), `GET /v1/batches[/{id}]`, `POST /v1/batches/{id}/cancel`.

A batch is a row in `api_batches`; each line becomes an ordinary job of the caller's tenant
(its id derived from the batch and the line, so enqueueing again is the same job) recorded in
`api_batch_requests` beside its `custom_id`. Validation and enqueueing are driven by one
gateway at a time, resumed by another if it stops (gateway/batch_driver.py); the lifecycle is
then read from the jobs' records by whichever replica is asked: in_progress until every job
has ended, then completed (or cancelled, or expired past the completion window), with the
output and error files."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gateway.batch_driver import REQUESTS, batch_name
from gateway.deps import Caller, gateway_of
from gateway.errors import ApiError, invalid, row_id
from gateway.files import file_id_of, file_name
from gateway.state import Gateway

router = APIRouter()
WINDOWS = {"24h": timedelta(hours=24)}
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
    gateway.background(gateway.batches.drive(batch_id))
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
        client = gateway.client_for(caller.tenant)
        gateway.background(gateway.batches.cancel_jobs(client, batch_id))
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
        # cancelling: once what was enqueued has ended (lines never sent never will be)
        left = counts.running if row["status"] == "cancelling" else counts.pending
        if left == 0 or late:
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
