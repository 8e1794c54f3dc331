"""`POST /v1/files` (purpose `batch`: JSONL, streamed from the request into the database a
chunk of lines at a time), `GET /v1/files` (the tenant's own, newest first, OpenAI's cursor
pages), `GET /v1/files/{id}`, `GET /v1/files/{id}/content` (an input file as uploaded; a
batch's output or error file written from its jobs' records as it is read),
`DELETE /v1/files/{id}`."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from gateway.batch_lines import output_lines
from gateway.deps import Caller, gateway_of
from gateway.errors import ApiError, invalid, row_id
from gateway.state import Gateway

router = APIRouter()
PURPOSES = ("batch",)
MAX_LISTED = 10_000  # files a list page holds (OpenAI's limit and default)


def file_name(file_id: uuid.UUID) -> str:
    return f"file-{file_id.hex}"


def file_id_of(name: str) -> uuid.UUID:
    return row_id(name, "file-", "file", "file_id")


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": file_name(row["id"]),
        "object": "file",
        "bytes": row["bytes"],
        "created_at": int(row["created_at"].timestamp()),
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


@router.post("/v1/files")
async def upload(caller: Caller, request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    async with request.form(max_files=1, max_fields=4) as form:  # spooled to disk, not memory
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES:
            raise invalid(f"purpose: only {', '.join(PURPOSES)} is supported", param="purpose")
        if not isinstance(upload, UploadFile):
            raise invalid("file: a file is required (multipart/form-data)", param="file")
        name = (upload.filename or "upload.jsonl")[:256]
        lines = io.TextIOWrapper(upload.file, encoding="utf-8", newline="")
        try:
            row = await asyncio.to_thread(
                gateway.store.create_file, caller.tenant, purpose, name, lines
            )
        except UnicodeDecodeError:
            raise invalid("file: not UTF-8 text", param="file") from None
        finally:
            lines.detach()
    return file_object(row)


async def _file(gateway: Gateway, tenant: str, name: str) -> dict[str, Any]:
    row = await asyncio.to_thread(gateway.store.file, tenant, file_id_of(name))
    if row is None:
        raise ApiError(404, f"No such file: {name}", param="file_id")
    return row


@router.get("/v1/files")
async def list_files(
    caller: Caller,
    request: Request,
    purpose: str | None = None,
    limit: int = Query(MAX_LISTED, ge=1, le=MAX_LISTED),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    gateway = gateway_of(request)
    rows, more = await asyncio.to_thread(
        gateway.store.files,
        caller.tenant,
        limit=limit,
        newest_first=order == "desc",
        after=file_id_of(after) if after else None,
        purpose=purpose,
    )
    data = [file_object(row) for row in rows]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "has_more": more, "first_id": first, "last_id": last}


@router.delete("/v1/files/{name}")
async def delete_file(caller: Caller, name: str, request: Request) -> dict[str, Any]:
    """The file and its lines go; an input a batch still reads stays (409)."""
    gateway = gateway_of(request)
    row = await _file(gateway, caller.tenant, name)
    if await asyncio.to_thread(gateway.store.file_in_use, row["id"]):
        raise ApiError(
            409, f"File {name} is the input of a batch that has not ended.", code="file_in_use"
        )
    if not await asyncio.to_thread(gateway.store.delete_file, caller.tenant, row["id"]):
        raise ApiError(404, f"No such file: {name}", param="file_id")
    return {"id": file_name(row["id"]), "object": "file", "deleted": True}


@router.get("/v1/files/{name}")
async def get_file(caller: Caller, name: str, request: Request) -> dict[str, Any]:
    return file_object(await _file(gateway_of(request), caller.tenant, name))


@router.get("/v1/files/{name}/content")
async def file_content(caller: Caller, name: str, request: Request) -> StreamingResponse:
    gateway = gateway_of(request)
    row = await _file(gateway, caller.tenant, name)
    if row["batch_id"] is None:
        chunks = gateway.store.lines(row["id"])
        body = _chunked(chunks, lambda lines: "".join(f"{text}\n" for _, text in lines))
    else:
        batch = await asyncio.to_thread(gateway.store.batch, caller.tenant, row["batch_id"])
        assert batch is not None
        chunks = gateway.store.outputs(row["batch_id"])
        body = _chunked(chunks, lambda rows: output_lines(batch, rows, row["kind"]))
    return StreamingResponse(body, media_type="application/jsonl")


async def _chunked(chunks: Any, render: Any) -> AsyncIterator[bytes]:
    """Each chunk read in a thread (the database), rendered, sent."""
    sentinel = object()
    while (chunk := await asyncio.to_thread(next, chunks, sentinel)) is not sentinel:
        yield render(chunk).encode()
