"""What the engine loop (and the intake, for refusals) hands the result sink."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from worker.engine.api import EngineOutput, EngineStats
from worker.service.jobs import LiveJob
from worker.service.usage import UsageReport


@dataclass(frozen=True, slots=True)
class Finished:
    job: LiveJob
    output: EngineOutput
    stats: EngineStats  # the engine's counters right after the step that finished it


@dataclass(frozen=True, slots=True)
class Failed:
    job_id: uuid.UUID
    error: str
    model: str = ""
    expired: bool = False  # its deadline passed: status `expired`, not `failed`
    compute_s: float = 0.0  # engine seconds it had used


@dataclass(frozen=True, slots=True)
class Dropped:
    """A running job aborted because it was cancelled: its compute is still billed."""

    job_id: uuid.UUID
    model: str
    compute_s: float


Outcome = Finished | Failed | Dropped | UsageReport
