"""One runtime per worker process: the model (loaded once), the repository and the batcher.

`handle` is what a Celery task thread runs: validate, record, admit, then wait for the batch.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

from celery import Celery
from pydantic import ValidationError
from structlog.contextvars import bound_contextvars

from api_client.schema import JobMessage
from inferq.logs import get_logger
from inferq.settings import Settings
from storage.records import TERMINAL_STATUSES, NewJob
from storage.repository import Repository
from worker.batcher import Batcher, WorkItem
from worker.engine_api import Engine, StreamingEngine
from worker.stream_batcher import StreamingBatcher

log = get_logger("inferq.worker")


def load_engine(settings: Settings) -> Engine:
    """Prepare (cached) and load the configured model once."""
    from worker.model_prep import resolve_model
    from worker.padded_engine import PaddedEngine
    from worker.paged_engine import EngineConfig, PagedEngine

    path = resolve_model(settings)
    if settings.engine == "padded":
        return PaddedEngine(path, settings.model, device=settings.device, dtype=settings.dtype)
    config = EngineConfig(
        kv_cache_tokens=settings.kv_cache_tokens,
        max_num_seqs=settings.max_num_seqs,
        max_step_tokens=settings.max_step_tokens,
        aging_s=settings.aging_s,
        prefix_cache=settings.prefix_cache,
        cache_secret=settings.cache_secret,
    )
    engine = PagedEngine(path, settings.model, settings.device, settings.dtype, config)
    engine.warm_up()
    return engine


class WorkerRuntime:
    def __init__(
        self, settings: Settings, engine: Engine | None = None, repo: Repository | None = None
    ):
        self.settings = settings
        self.worker = settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.repo = repo or Repository(settings.resolved_database_url)
        self.engine = engine or load_engine(settings)
        self.max_context = getattr(self.engine, "max_context", 2048)
        streaming = isinstance(self.engine, StreamingEngine)
        batcher_cls = StreamingBatcher if streaming else Batcher
        self.batcher = batcher_cls(self.engine, self.repo, settings, self.worker)
        self.batcher.start()
        log.info("worker.ready", worker=self.worker, model=self.engine.model_name)

    def close(self) -> None:
        self.batcher.stop()

    def admission_error(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a job cannot run here, or None."""
        s = self.settings
        if prompt_tokens == 0:
            return "prompt is empty after tokenization"
        if prompt_tokens > s.max_prompt_tokens:
            return f"prompt has {prompt_tokens} tokens; the limit is {s.max_prompt_tokens}"
        if max_tokens > s.max_new_tokens:
            return f"max_tokens {max_tokens} exceeds this worker's limit {s.max_new_tokens}"
        if prompt_tokens + max_tokens > self.max_context:
            return (
                f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.max_context} tokens"
            )
        return None

    def handle(self, kwargs: dict[str, Any]) -> str:
        """Process one delivered job message; returns the job's final status."""
        with bound_contextvars(job_id=str(kwargs.get("job_id")), worker=self.worker):
            try:
                msg = JobMessage.model_validate(kwargs)
            except ValidationError as exc:
                self.repo.record_dead_letter(
                    "invalid job message",
                    kwargs,
                    str(exc),
                    job_id=_uuid_or_none(kwargs.get("job_id")),
                )
                log.error("job.invalid", error=str(exc))
                return "invalid"
            model = msg.model or self.engine.model_name
            job_id = msg.job_id
            canonical = self.repo.ensure_jobs([NewJob.from_message(msg, model)])[job_id]
            if canonical != job_id:
                log.info("job.duplicate", existing_job_id=str(canonical))
                return "duplicate"
            status = self.repo.statuses([job_id]).get(job_id)
            if status in TERMINAL_STATUSES:
                log.info("job.already_final", status=status)
                return status
            error = None
            if model != self.engine.model_name:
                error = f"unknown model {model!r}: this worker serves {self.engine.model_name!r}"
            else:
                messages = [m.model_dump() for m in msg.messages] if msg.messages else None
                try:
                    prompt_ids = self.engine.encode(msg.prompt, messages)
                except Exception as exc:
                    prompt_ids, error = [], f"could not tokenize the input: {exc!r}"
                error = error or self.admission_error(len(prompt_ids), msg.params.max_tokens)
            if error:
                self.repo.fail_jobs({job_id: error}, final=True)
                log.warning("job.refused", error=error)
                return "failed"
            item = WorkItem(
                job_id, prompt_ids, msg.params, msg.tenant, msg.priority, msg.submitted_at
            )
            status = self.batcher.submit(item).result()
            log.info("job.finished", status=status)
            return status


def _uuid_or_none(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def get_runtime(app: Celery) -> WorkerRuntime:
    """The process's runtime, created on first use (model loaded once)."""
    if app.inferq_runtime is None:
        with app.inferq_lock:
            if app.inferq_runtime is None:
                app.inferq_runtime = WorkerRuntime(app.inferq_settings)
    return app.inferq_runtime


def record_dead_letter(app: Celery, reason: str, message, exc: BaseException | None) -> None:
    """Keep an undeliverable message's raw body and why, in storage."""
    body = message.body
    if not isinstance(body, bytes | str):
        body = json.dumps(body, default=str)
    raw = body.encode() if isinstance(body, str) else body
    headers = json.loads(json.dumps(message.headers or {}, default=str))
    payload: dict[str, Any] = {"content_type": message.content_type, "headers": headers}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # JSON columns take neither
        payload["body_base64"] = base64.b64encode(raw).decode()
    else:
        payload["body"] = text
    repo = Repository(app.inferq_settings.resolved_database_url)
    repo.record_dead_letter(reason, payload, repr(exc) if exc else "", job_id=None)
    log.error("message.dead_letter", reason=reason, error=repr(exc) if exc else None)
