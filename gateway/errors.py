"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`, with the
status codes OpenAI's SDKs map to their exception classes."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from inferq.logs import get_logger

log = get_logger("inferq.gateway")

INVALID = "invalid_request_error"
TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: INVALID,
    413: INVALID,
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or TYPES.get(status, INVALID if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_errors(errors: Sequence[Any]) -> ApiError:
    """A 400 naming the first field a request's validation refused (pydantic's errors)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return invalid(message, param=param)


def job_refused(message: str) -> ApiError:
    """A job the wire schema refused (`InvalidJobError`: `invalid job: params.x: ...`): a
    400 naming the field as the request names it."""
    detail = message.removeprefix("invalid job: ")
    field, sep, _ = detail.partition(": ")
    param = field.removeprefix("params.") if sep and " " not in field else None
    return invalid(detail, param=param)


def install(app: FastAPI) -> None:
    """Every error the app answers, in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_errors(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        message = "Not found" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("gateway.error", error=type(exc).__name__)  # never the request's content
        return ApiError(500, "internal error").response()


def row_id(name: str, prefix: str, what: str, param: str) -> uuid.UUID:
    """The row id in a public id (`prefix` + hex, as OpenAI names its objects); a 404 naming
    `what` for anything else."""
    try:
        return uuid.UUID(hex=name.removeprefix(prefix))
    except ValueError:
        raise ApiError(404, f"No such {what}: {name}", param=param) from None
