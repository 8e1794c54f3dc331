"""Helpers for the service tests: a worker service in this process, waiting on jobs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery

from storage.repository import Repository
from worker.service.app import WorkerService


@contextmanager
def running_worker(settings, engines: dict, repo: Repository | None = None) -> Iterator:
    """A `WorkerService` on `settings` serving `engines` (name -> engine), started and
    stopped around the block."""
    service = WorkerService(settings, engines=engines, repo=repo)
    with service:
        yield service


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


def producer(settings) -> Celery:
    """A bare Celery producer, as a backend app without our client would have."""
    return Celery("backend-app", broker=settings.broker_url, set_as_current=False)
