"""Helpers for the service tests: a worker service in this process, waiting on jobs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from celery import Celery

from inferq.settings import FP_MODEL
from storage.repository import Repository
from worker.engine.null import NullEngine
from worker.service.app import WorkerService


@contextmanager
def running_worker(settings, engines: dict, repo: Repository | None = None) -> Iterator:
    """A `WorkerService` on `settings` serving `engines` (name -> engine), started and
    stopped around the block."""
    service = WorkerService(settings, engines=engines, repo=repo)
    with service:
        yield service


def worker_process(
    settings, model_path: str, log: Path, name: str, **extra: str
) -> subprocess.Popen:
    """`inferq worker` in a process of its own (its own session: kill the group) on the
    settings' broker, database and queue, serving the fp32 model; `extra`: more INFERQ_*."""
    env = {
        **os.environ,
        "INFERQ_BROKER_URL": settings.broker_url,
        "INFERQ_DATABASE_URL": settings.database_url,
        "INFERQ_QUEUE": settings.queue,
        "INFERQ_HOME": str(settings.home),
        "INFERQ_MODEL": FP_MODEL,
        "INFERQ_MODEL_PATH": model_path,
        "INFERQ_VISIBILITY_TIMEOUT_S": "10",
        "INFERQ_WORKER_NAME": name,
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "inferq.cli", "worker", "--loglevel", "INFO"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(repo: Repository, ids: list[uuid.UUID], timeout: float = 120.0) -> dict:
    """Views of `ids` once every one is done, failed or cancelled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = repo.get_many(ids)
        if len(views) == len(ids) and all(
            v.status in ("done", "failed", "cancelled") for v in views.values()
        ):
            return views
        time.sleep(0.1)
    raise AssertionError(f"jobs not finished: {repo.statuses(ids)}")


def records(settings) -> Repository:
    """The database, as an operator reads it (producers read results from Redis)."""
    return Repository(settings.database_url)


def wait_status(client, job_id: uuid.UUID, status: str, timeout: float = 60.0):
    """Poll `client.get` until the job shows `status` (None while it is queued)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(job_id)
        if view is not None and view.status == status:
            return view
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not {status} after {timeout}s: {client.get(job_id)}")


def producer(settings) -> Celery:
    """A bare Celery producer, as a backend app without our client would have."""
    return Celery("backend-app", broker=settings.broker_url, set_as_current=False)


def envelope(
    queue: str,
    body: bytes | str,
    *,
    content_type: str = "application/json",
    task: str = "inferq.generate",
    task_id: uuid.UUID | None = None,
    tag: str | None = None,
    origin: str | None = None,
) -> str:
    """A kombu envelope as the Redis transport keeps it, around any body (to push raw)."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    headers = {"task": task, "id": str(task_id or uuid.uuid4()), "lang": "py"}
    if origin is not None:
        headers["origin"] = origin  # Celery's producer host header
    return json.dumps(
        {
            "body": base64.b64encode(raw).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "delivery_tag": tag or str(uuid.uuid4()),
                "delivery_info": {"exchange": queue, "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
            },
        }
    )


def workers_of(repo: Repository, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The worker each of `ids` finished on (from its facts row)."""
    import sqlalchemy as sa

    with repo.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT job_id, worker FROM job_metrics WHERE job_id = ANY(:ids)"),
            {"ids": ids},
        )
        return dict(rows.all())


class GatedEngine(NullEngine):
    """The null engine, holding every sequence until `gate` is set."""

    def __init__(self) -> None:
        super().__init__("null")
        self.gate = threading.Event()

    def step(self):
        if not self.gate.is_set():
            time.sleep(0.01)
            return []
        return super().step()
