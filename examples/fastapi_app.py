"""A FastAPI app that serves completions through inferq workers, with `AsyncInferqClient`:
the app needs the broker's Redis only (no database URL, no worker code).

    INFERQ_BROKER_URL=redis://localhost:6379/0 uvicorn examples.fastapi_app:app

- `POST /jobs` enqueues a job; `GET /jobs/{id}` reads its state (404 while queued);
  `GET /jobs/{id}/result` waits for it; `DELETE /jobs/{id}` cancels it;
- `GET /jobs/{id}/stream` streams its text as it is generated (plain text, chunked);
- `POST /complete` enqueues and waits: one request, one answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from api_client import AsyncInferqClient, InvalidJobError


class Ask(BaseModel):
    prompt: str
    max_tokens: int = Field(64, ge=1)
    idempotency_key: str | None = None


def create_app(client: AsyncInferqClient | None = None) -> FastAPI:
    """The app, on `client` (default: one from the `INFERQ_*` settings, closed at shutdown)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client is not None:  # the caller's: it closes it
            yield
            return
        app.state.inferq = AsyncInferqClient()
        yield
        await app.state.inferq.aclose()

    app = FastAPI(title="inferq example", lifespan=lifespan)
    app.state.inferq = client

    def inferq() -> AsyncInferqClient:
        return app.state.inferq

    async def submit(ask: Ask) -> Any:
        try:
            return await inferq().submit(
                messages=[{"role": "user", "content": ask.prompt}],
                params={"max_tokens": ask.max_tokens},
                idempotency_key=ask.idempotency_key,
            )
        except InvalidJobError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.post("/jobs", status_code=202)
    async def create_job(ask: Ask) -> dict[str, str]:
        return {"job_id": str(await submit(ask))}

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        view = await inferq().get(job_id)
        if view is None:
            raise HTTPException(404, "queued, unknown, or its result has expired")
        return view.to_dict()

    @app.get("/jobs/{job_id}/result")
    async def wait_job(job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        try:
            return (await inferq().wait(job_id, timeout=timeout)).to_dict()
        except TimeoutError:
            raise HTTPException(504, "not finished yet") from None

    @app.delete("/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict[str, bool]:
        return {"cancelled": await inferq().cancel(job_id)}

    @app.get("/jobs/{job_id}/stream")
    async def stream_job(job_id: str) -> StreamingResponse:
        return StreamingResponse(inferq().stream(job_id), media_type="text/plain")

    @app.post("/complete")
    async def complete(ask: Ask) -> dict[str, Any]:
        view = await inferq().wait(await submit(ask), timeout=300)
        if view.result is None:
            raise HTTPException(502, f"job {view.status}: {view.error}")
        return {"job_id": str(view.id), "text": view.result.text,
                "finish_reason": view.result.finish_reason}  # fmt: skip

    return app


app = create_app()
