"""What every route takes: the process's `Gateway` and the caller's API key (`Caller`: 401
before anything else is looked at, 429 over its rate)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.state import Gateway
from storage.api_keys import TenantKey


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


async def _caller(request: Request) -> TenantKey:
    return await gateway_of(request).tenant(request)


Caller = Annotated[TenantKey, Depends(_caller)]
