"""`POST /v1/files` (purpose `batch`: JSONL, streamed from the request into the database a
chunk of lines at a time), `GET /v1/files/{id}`, `GET /v1/files/{id}/content` (an input file
as uploaded; a batch's output or error file written from its jobs' records as it is read)."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from gateway.batch_lines import output_lines
from gateway.deps import Caller, gateway_of
from gateway.errors import ApiError, invalid, row_id
from gateway.state import Gateway

router = APIRouter()
PURPOSES = ("batch",)


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
