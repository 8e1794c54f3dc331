"""A job as the service tracks it between intake and the result sink, and the ledger of
the jobs this worker holds (thread-safe: intake, engine loop and sink all read it)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import datetime

from worker.engine.api import EngineRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveJob(EngineRequest):
    """A job this worker runs: the request the engine runs (`seq_id` is the job's id), plus
    what the sink needs to record it. Built once by the intake (`LiveJob.from_job`); read,
    never changed, by the engine loop and the sink."""

    seq_id: uuid.UUID
    model: str
    enqueued_at: datetime | None = None  # the producer's clock, bounded; None: not sent
    callback: bool = False  # its message has a callback URL: its end may owe a webhook


class Ledger:
    """The jobs this worker holds, from claim until their outcome is committed."""

    def __init__(self) -> None:
        self._jobs: dict[uuid.UUID, LiveJob] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def add(self, job: LiveJob) -> None:
        with self._lock:
            self._jobs[job.seq_id] = job

    def pop(self, job_id: uuid.UUID) -> LiveJob | None:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def ids(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._jobs)
