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


def load_engine(settings: Settings, name: str, path: str | None = None) -> Engine:
    """Prepare (cached) and load one model."""
    from worker.model_prep import resolve_model
    from worker.padded_engine import PaddedEngine
    from worker.paged_engine import EngineConfig, PagedEngine

    where = resolve_model(settings, name, path)
    if settings.engine == "padded":
        return PaddedEngine(where, name, settings.device, settings.dtype, settings.gptq_backend)
    config = EngineConfig(
        kv_cache_tokens=settings.kv_cache_tokens,
        max_num_seqs=settings.max_num_seqs,
        max_step_tokens=settings.max_step_tokens,
        aging_s=settings.aging_s,
        prefix_cache=settings.prefix_cache,
        cache_secret=settings.cache_secret,
        gptq_backend=settings.gptq_backend,
    )
    engine = PagedEngine(where, name, settings.device, settings.dtype, config)
    engine.warm_up()
    return engine


def load_engines(settings: Settings, have: dict[str, Engine]) -> tuple[dict[str, Engine], dict]:
    """Every served model not in `have`; a model that fails to load is reported, not fatal."""
    engines, errors = dict(have), {}
    for name, path in settings.served_models().items():
        if name in engines:
            continue
        try:
            engines[name] = load_engine(settings, name, path)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("model.load_failed", model=name, error=errors[name])
    if not engines:
        raise RuntimeError(f"no model could be loaded: {errors}")
    return engines, errors


class WorkerRuntime:
    """The models this worker serves (each with its engine and batcher), and the repository."""

    def __init__(
        self, settings: Settings, engine: Engine | None = None, repo: Repository | None = None
    ):
        self.settings = settings
        self.worker = settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.repo = repo or Repository(settings.resolved_database_url)
        have = {engine.model_name: engine} if engine is not None else {}
        self.engines, self.load_errors = load_engines(settings, have)
        self.default_model = settings.model if engine is None else engine.model_name
        self.batchers: dict[str, Batcher] = {}
        for name, eng in self.engines.items():
            batcher_cls = StreamingBatcher if isinstance(eng, StreamingEngine) else Batcher
            self.batchers[name] = batcher_cls(eng, self.repo, settings, self.worker)
            self.batchers[name].start()
        log.info("worker.ready", worker=self.worker, models=sorted(self.engines))

    @property
    def engine(self) -> Engine:
        """The default model's engine (the first served one if the default failed to load)."""
        return self.engines.get(self.default_model) or next(iter(self.engines.values()))

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.stop()

    def admission_error(self, engine: Engine, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a job cannot run on `engine`, or None."""
        s = self.settings
        max_context = getattr(engine, "max_context", 2048)
        if prompt_tokens == 0:
            return "prompt is empty after tokenization"
        if prompt_tokens > s.max_prompt_tokens:
            return f"prompt has {prompt_tokens} tokens; the limit is {s.max_prompt_tokens}"
        if max_tokens > s.max_new_tokens:
            return f"max_tokens {max_tokens} exceeds this worker's limit {s.max_new_tokens}"
        if prompt_tokens + max_tokens > max_context:
            return (
                f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {max_context} tokens"
            )
        return None

    def model_error(self, model: str) -> str | None:
        if model in self.load_errors:
            return f"model {model!r} failed to load on this worker: {self.load_errors[model]}"
        if model not in self.engines:
            return f"unknown model {model!r}: this worker serves {sorted(self.engines)}"
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
            model = msg.model or self.default_model
            job_id = msg.job_id
            canonical = self.repo.ensure_jobs([NewJob.from_message(msg, model)])[job_id]
            if canonical != job_id:
                log.info("job.duplicate", existing_job_id=str(canonical))
                return "duplicate"
            status = self.repo.statuses([job_id]).get(job_id)
            if status in TERMINAL_STATUSES:
                log.info("job.already_final", status=status)
                return status
            error = self.model_error(model)
            if error is None:
                engine = self.engines[model]
                messages = [m.model_dump() for m in msg.messages] if msg.messages else None
                try:
                    prompt_ids = engine.encode(msg.prompt, messages)
                except Exception as exc:
                    prompt_ids, error = [], f"could not tokenize the input: {exc!r}"
                error = error or self.admission_error(
                    engine, len(prompt_ids), msg.params.max_tokens
                )
            if error:
                self.repo.fail_jobs({job_id: error}, final=True)
                log.warning("job.refused", error=error)
                return "failed"
            item = WorkItem(
                job_id, prompt_ids, msg.params, msg.tenant, msg.priority, msg.submitted_at
            )
            status = self.batchers[model].submit(item).result()
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
