"""A job as the service tracks it between intake and the result sink, and the ledger of
the jobs this worker holds (thread-safe: intake, engine loop and sink all read it)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import datetime

from worker.engine.api import EngineRequest


@dataclass(slots=True)
class LiveJob:
    """A claimed job: what the engine runs and what the sink needs to record it."""

    id: uuid.UUID
    model: str
    request: EngineRequest
    enqueued_at: datetime | None = None  # the producer's clock, bounded; None: not sent
    expires_at: datetime | None = None  # past it, the job is dropped wherever it is


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
            self._jobs[job.id] = job

    def pop(self, job_id: uuid.UUID) -> LiveJob | None:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def ids(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._jobs)
