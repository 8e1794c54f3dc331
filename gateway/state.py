"""What one gateway process holds: the producer client (one Celery app and Redis pool shared
by every tenant's client), API key lookups, and the live workers' models. Nothing here
outlives the process: every replica answers the same from Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from fastapi import Request

from api_client import AsyncInferqClient
from gateway.auth import Authenticator, check_rate
from gateway.batch_driver import BatchDriver
from gateway.errors import ApiError
from gateway.quota import Quotas
from inferq.params import MAX_TOKENS
from inferq.settings import Settings
from storage.api_keys import ApiKeys, TenantKey
from storage.batch_store import BatchStore
from storage.fleet import live_models
from storage.repository import Repository


class Gateway:
    def __init__(self, settings: Settings, client: AsyncInferqClient) -> None:
        self.settings, self.client = settings, client
        url = settings.resolved_database_url
        self.repo = Repository(url)
        self.auth = Authenticator(ApiKeys(self.repo.engine), settings.gateway_key_cache_s)
        self.store = BatchStore(self.repo.engine)
        self._tasks: set[asyncio.Task] = set()
        self._sweep: asyncio.Task | None = None
        self.stopping = False  # batch drivers stop at their next step (another resumes them)
        self.signing = settings.signing_keys()
        self.default_max_tokens = min(settings.max_new_tokens, MAX_TOKENS)
        self._clients: dict[str, AsyncInferqClient] = {}
        self._models: tuple[frozenset[str], float] = (frozenset(), 0.0)
        self._models_read = asyncio.Lock()  # one re-read at a time, however many ask
        self.quotas = Quotas(client.redis)
        self.batches = BatchDriver(self)

    async def tenant(self, request: Request) -> TenantKey:
        """The request's tenant (401), within its rate (429)."""
        key = await self.auth.tenant(request.headers.get("authorization"))
        await check_rate(self.client.redis, key)
        return key

    def client_for(self, tenant: str) -> AsyncInferqClient:
        """The tenant's client: it signs with the tenant's first key in INFERQ_TENANT_KEYS
        (the workers' own setting), so what the gateway enqueues is the tenant's alone."""
        client = self._clients.get(tenant)
        if client is None:
            key = self.signing.get(tenant, (None,))[0]
            client = self._clients[tenant] = self.client.for_tenant(tenant, key, shared=True)
        return client

    async def models(self) -> frozenset[str]:
        """The models live workers serve (their heartbeats), re-read every few seconds."""
        async with self._models_read:
            served, until = self._models
            if time.monotonic() < until:
                return served
            dead_after = self.settings.worker_dead_after_s
            served = frozenset(await asyncio.to_thread(live_models, self.repo, dead_after))
            self._models = (served, time.monotonic() + self.settings.gateway_models_cache_s)
            return served

    async def require_model(self, name: str) -> None:
        if name not in await self.models():
            raise ApiError(
                503,
                f"No worker serves the model '{name}' now.",
                code="model_not_available",
                param="model",
            )

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` beside the requests (a batch's enqueueing), holding on to it."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        """The batch sweep (at once: a batch a stopped gateway left is resumed)."""
        self._sweep = asyncio.get_running_loop().create_task(self.batches.sweep_forever())

    async def drain(self, timeout: float) -> None:
        """At shutdown: stop sweeping, let background work finish (a batch driven again
        later is the same jobs), up to `timeout` s."""
        self.stopping = True
        if self._sweep is not None:
            self._sweep.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
