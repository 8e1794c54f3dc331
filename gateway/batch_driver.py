"""Driving a batch: validating its input, writing one request row per line, then enqueueing
each line's job. Whichever gateway holds the batch's lease (storage/batch_feed.py, on the
database's clock) drives it; every replica sweeps at start and every
`INFERQ_GATEWAY_BATCH_SWEEP_S` for batches nobody drives, so a batch whose gateway was killed
mid-way is taken on where its rows stop, once that gateway's lease has lapsed.

Nothing is done twice: a line's row is written once (a line written again is the same row),
and its job id comes from the batch and the line (idempotency key `batch_<id>:<line>`), so a
job enqueued again, because its gateway stopped between sending it and noting it as sent, is
the same job and runs once.

Token quotas: a tenant's lines are charged to its quota as they are enqueued, and wait for its
window when it is full (gateway/batch_quota.py).

Signing: a job is built, stamped (`submitted_at`) and signed as it is enqueued, so the
workers' signature window (`INFERQ_SIGNATURE_WINDOW_S`) runs from then. A signed tenant's
batch keeps at most `INFERQ_GATEWAY_BATCH_AHEAD` jobs queued and not yet taken, and a line
whose job no worker took within the window (a worker refuses that message as stale) is
enqueued again, freshly signed, as the same job."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from api_client import AsyncInferqClient, InvalidJobError
from api_client.schema import JobMessage
from gateway.batch_quota import QUOTA_RECHECK_S, BatchQuota
from gateway.errors import ApiError, from_errors, invalid, job_refused
from gateway.schema import ChatRequest, CompletionRequest
from inferq.logs import get_logger
from storage.batch_feed import BatchFeed, Lease
from storage.batch_store import CHUNK

if TYPE_CHECKING:
    from gateway.state import Gateway

log = get_logger("inferq.gateway")
REQUESTS = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}
MAX_STRUCTURE_ERRORS = 100
AHEAD_POLL_S = 0.5  # how often a batch at its bound looks whether workers took some


def batch_name(batch_id: uuid.UUID) -> str:
    return f"batch_{batch_id.hex}"


class BatchDriver:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway, self.settings = gateway, gateway.settings
        self.feed = BatchFeed(gateway.repo.engine)
        self.lease_s = self.settings.gateway_batch_lease_s
        recheck_s = min(QUOTA_RECHECK_S, self.lease_s / 3)  # the lease renewed as it waits
        self.quota = BatchQuota(gateway.quotas, gateway.auth.keys, recheck_s)

    async def sweep_forever(self) -> None:
        """At start and every sweep period: drive each batch that nobody drives."""
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # the database may be away a while: try again later
                log.error("gateway.batch_sweep_failed", error=type(exc).__name__)
            await asyncio.sleep(self.settings.gateway_batch_sweep_s)

    async def sweep(self) -> None:
        window = self.settings.signature_window_s
        batches = await asyncio.to_thread(self.feed.to_drive, self.gateway.signing, window)
        for batch_id, _ in batches:  # each beside the others (a lease held: returns at once)
            self.gateway.background(self.drive(batch_id))

    async def drive(self, batch_id: uuid.UUID) -> None:
        """Take the batch's lease and move it on as far as it goes: validate and write its
        rows, then enqueue its due lines; a batch another gateway drives is left alone."""
        lease = await asyncio.to_thread(self.feed.take, batch_id, self.lease_s)
        if lease is None:
            return
        try:
            row = await asyncio.to_thread(self.gateway.store.batch_row, batch_id)
            client = self.gateway.client_for(row["tenant"])
            if lease.status == "validating":
                lease = await self._expand(row, client, lease)
            if lease is not None and lease.status == "in_progress":
                lease = await self._send(row, client, lease)
        except Exception as exc:
            log.error("gateway.batch_failed", batch=str(batch_id), error=type(exc).__name__)
            failure = _failure("internal_error", str(exc)[:500])
            await asyncio.to_thread(
                self.gateway.store.move, batch_id, ["validating"], "failed", errors=failure
            )
        finally:
            if lease is not None:
                await asyncio.to_thread(self.feed.release, lease)

    async def _renew(self, lease: Lease) -> Lease | None:
        return await asyncio.to_thread(self.feed.renew, lease, self.lease_s)

    async def _expand(
        self, row: dict[str, Any], client: AsyncInferqClient, lease: Lease
    ) -> Lease | None:
        """Validate every line, then write the request rows past those written already;
        then in progress."""
        store, batch_id = self.gateway.store, row["id"]
        errors = await asyncio.to_thread(_structure_errors, self.gateway, row)
        if errors:
            failure = {"object": "list", "data": errors}
            await asyncio.to_thread(store.move, batch_id, ["validating"], "failed", errors=failure)
            return lease
        after = await asyncio.to_thread(self.feed.stored_through, batch_id)
        chunks = store.lines(row["input_file_id"], after)
        sentinel: Any = object()
        while (chunk := await asyncio.to_thread(next, chunks, sentinel)) is not sentinel:
            if self.gateway.stopping:
                return lease  # released now: another gateway goes on from the rows written
            renewed = await self._renew(lease)
            if renewed is None or renewed.status != "validating":
                return renewed  # cancelled meanwhile, or no longer ours
            lease = renewed
            rows = [self._request_row(row, client, n, text) for n, text in chunk]
            await asyncio.to_thread(self.feed.add_requests, batch_id, rows)
        await asyncio.to_thread(store.move, batch_id, ["validating"], "in_progress")
        return await self._renew(lease)

    async def _send(
        self, row: dict[str, Any], client: AsyncInferqClient, lease: Lease
    ) -> Lease | None:
        """Enqueue the due lines' jobs, a chunk at a time (for a signed tenant, as long as
        fewer than the bound wait in the queue; for a tenant with a token quota, as far as it
        allows, gateway/batch_quota.py), until none is due."""
        batch_id, feed = row["id"], self.feed
        window = self.settings.signature_window_s if client.key else None
        ahead, paced = self.settings.gateway_batch_ahead, False
        while not self.gateway.stopping:
            renewed = await self._renew(lease)
            if renewed is None or renewed.status != "in_progress":
                if renewed is not None and renewed.status == "cancelling":
                    await self.cancel_jobs(client, batch_id)  # what it sent meanwhile too
                return renewed
            lease, room = renewed, 1 if paced else CHUNK  # waiting on the quota: one line
            if datetime.now(UTC) >= row["expires_at"]:
                return lease  # past its window: what was not sent is expired
            if window is not None:
                room = min(CHUNK, ahead - await asyncio.to_thread(feed.waiting, batch_id, window))
                if room <= 0:
                    await asyncio.sleep(AHEAD_POLL_S)
                    continue
            due = await asyncio.to_thread(
                feed.due_lines, batch_id, row["input_file_id"], window, room
            )
            if not due:
                return lease
            jobs = []
            for line_no, text in due:
                built = self._build(row, client, line_no, text)
                if isinstance(built, JobMessage):
                    jobs.append((line_no, built))
                else:  # refused now though its row was written (the settings changed)
                    await asyncio.to_thread(feed.refuse, batch_id, line_no, built)
            charged = await self.quota.charge(row["tenant"], batch_id, jobs)
            for line_no, error in charged.refused:  # over the quota alone
                await asyncio.to_thread(feed.refuse, batch_id, line_no, error)
            for _, job in charged.send:
                await client.send(job)
            await asyncio.to_thread(feed.mark_sent, batch_id, [n for n, _ in charged.send])
            paced = charged.wait_s is not None
            if charged.wait_s is not None:  # the window is full: the rest wait
                await asyncio.sleep(charged.wait_s)
        return lease

    async def cancel_jobs(self, client: AsyncInferqClient, batch_id: uuid.UUID) -> None:
        """Ask the workers to cancel every job of the batch enqueued and not ended."""
        for job_id in await asyncio.to_thread(self.gateway.store.unended_jobs, batch_id):
            await client.cancel(job_id, wait=0)

    def _request_row(
        self, row: dict[str, Any], client: AsyncInferqClient, line_no: int, text: str
    ) -> dict[str, Any]:
        """A line's request row: its custom_id and its job's id, or why it is refused."""
        built = self._build(row, client, line_no, text)
        job = built if isinstance(built, JobMessage) else None
        return {
            "line_no": line_no,
            "custom_id": json.loads(text)["custom_id"],
            "job_id": job.job_id if job else None,
            "error": None if job else built,
        }

    def _build(
        self, row: dict[str, Any], client: AsyncInferqClient, line_no: int, text: str
    ) -> JobMessage | str:
        """The line's job, stamped now, with what is left of the completion window as its
        `ttl_s`; or the error body (JSON) of a line the request or wire schema refuses."""
        left = (row["expires_at"] - datetime.now(UTC)).total_seconds()
        kind = REQUESTS[row["endpoint"]]
        try:
            request = kind.model_validate(json.loads(text)["body"])
            if request.stream:
                raise invalid("stream: not supported in a batch", param="stream")
            fields = {**request.job_fields(self.gateway.default_max_tokens), "ttl_s": max(left, 1)}
            return client.build(**fields, idempotency_key=f"{batch_name(row['id'])}:{line_no}")
        except ValidationError as exc:
            return json.dumps(from_errors(exc.errors()).body())
        except InvalidJobError as exc:
            return json.dumps(job_refused(str(exc)).body())
        except ApiError as exc:
            return json.dumps(exc.body())


def _failure(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"code": code, "message": message, "param": None, "line": line}],
    }


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
        return _failure("empty_file", "the input file has no requests")["data"]
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
