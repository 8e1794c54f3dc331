"""The result sink commits at most once per `commit_interval_s`: a job that ends after a
quiet spell is written at once; jobs that end meanwhile share the next transaction. Real
Redis, PostgreSQL and model; the repository records when each write began."""

from __future__ import annotations

import itertools
import time

import pytest
from service_helpers import running_worker

from api_client import InferqClient
from storage.repository import Repository
from worker.engine.null import NullEngine
from worker.service.sink import MAX_PER_WRITE

pytestmark = [pytest.mark.model, pytest.mark.services]
INTERVAL_S = 1.0


class RecordingRepository(Repository):
    """The real repository; `writes`: (monotonic start, jobs with a result) per write."""

    def __init__(self, url: str):
        super().__init__(url)
        self.writes: list[tuple[float, int]] = []

    def store_outcomes(self, ended, *args, **kwargs):
        self.writes.append((time.monotonic(), len(ended)))
        return super().store_outcomes(ended, *args, **kwargs)


def test_writes_are_an_interval_apart_and_the_first_after_quiet_goes_at_once(
    service_settings, paged_engine
) -> None:
    settings = service_settings.model_copy(update={"commit_interval_s": INTERVAL_S})
    repo = RecordingRepository(settings.database_url)
    client = InferqClient(settings)
    with running_worker(settings, {paged_engine.model_name: paged_engine}, repo=repo):
        time.sleep(INTERVAL_S)  # quiet: the next write may go at once
        first = client.submit("Say hi:", params={"max_tokens": 4})
        view = client.wait(first, timeout=120)
        lag = time.time() - view.finished_at.timestamp()  # ended in the engine -> waiter has it
        assert view.status == "done" and lag < INTERVAL_S / 2, lag
        time.sleep(INTERVAL_S)
        repo.writes.clear()
        # ending over several steps, one after another
        ids = [client.submit(f"Count to {n}:", params={"max_tokens": 2 + 3 * n}) for n in range(12)]
        views = client.wait_many(ids, timeout=120)
        writes = list(repo.writes)  # not the stop's last write, which goes at once
    assert all(v.status == "done" for v in views)
    starts = [t for t, _ in writes]
    assert sum(ended for _, ended in writes) == len(ids)
    assert len([n for _, n in writes if n]) < len(ids)  # some shared a write
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g >= INTERVAL_S - 0.01 for g in gaps), gaps


def test_a_full_writes_worth_waiting_is_written_without_waiting_for_the_window(
    service_settings,
) -> None:
    """The window only gathers what trickles in: with more than MAX_PER_WRITE outcomes
    waiting, writes follow each other at once (a sink that slept every window through took at
    most MAX_PER_WRITE outcomes a window: 256 jobs/s at the default 0.5 s)."""
    settings = service_settings.model_copy(update={"commit_interval_s": 5.0, "model": "null"})
    repo = RecordingRepository(settings.database_url)
    client = InferqClient(settings)
    jobs = 3 * MAX_PER_WRITE + 10
    with running_worker(settings, {"null": NullEngine()}, repo=repo):
        time.sleep(1.0)
        ids = client.submit_many(
            {"prompt": f"job {n}", "params": {"max_tokens": 2}} for n in range(jobs)
        )
        views = client.wait_many(ids, timeout=60)
        writes = list(repo.writes)
    assert all(v.status == "done" for v in views)
    full = [i for i, (_, n) in enumerate(writes[:-1]) if n >= MAX_PER_WRITE]
    assert full, [n for _, n in writes]
    gaps = [writes[i + 1][0] - writes[i][0] for i in full]
    assert all(g < 2.5 for g in gaps), gaps  # well inside the 5 s window
