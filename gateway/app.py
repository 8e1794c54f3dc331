"""The gateway's FastAPI app: `create_app()` (what `inferq serve` runs under uvicorn)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_client import AsyncInferqClient
from gateway import batches, errors, files, routes
from gateway.state import Gateway
from inferq.settings import Settings, get_settings


def create_app(
    settings: Settings | None = None, client: AsyncInferqClient | None = None
) -> FastAPI:
    """The app on `settings` (default: `INFERQ_*`); `client`: the producer to enqueue with
    (default: one of its own, closed at shutdown)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = client is None
        producer = client or AsyncInferqClient(settings)
        app.state.gateway = gateway = Gateway(settings, producer)
        gateway.start()
        try:
            yield
        finally:
            await gateway.drain(timeout=30)
            if own:
                await producer.aclose()

    app = FastAPI(title="inferq gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    errors.install(app)
    for module in (routes, files, batches):
        app.include_router(module.router)
    limits = {"/v1/files": settings.gateway_max_file_bytes}
    app.add_middleware(BodyLimit, limit=settings.gateway_max_body_bytes, limits=limits)
    return app


class BodyLimit:
    """413 for a request body over `limit` bytes (or its path's limit in `limits`): by its
    Content-Length before anything is read. A body without one (chunked) is counted as it
    arrives: the files path is passed on as it comes (a large upload is never held; the
    413 is raised where the route reads it), any other is read here first, up to the limit."""

    def __init__(self, app: ASGIApp, limit: int, limits: dict[str, int]) -> None:
        self.app, self.default, self.limits = app, limit, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                await _too_large(limit).response()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["path"] in self.limits:
            await self.app(scope, _counted(receive, limit), send)
            return
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > limit:
                await _too_large(limit).response()(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}

        await self.app(scope, replay, send)


def _counted(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _too_large(limit)
        return message

    return counted


def _too_large(limit: int) -> errors.ApiError:
    return errors.ApiError(413, f"Request body over {limit} bytes.", code="request_too_large")
