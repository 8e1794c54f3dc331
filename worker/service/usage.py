"""Engine time per worker, model and hour: busy seconds come from the engine's own counters
(the sum of its jobs' `compute_s`), idle seconds are the rest of the loop's wall time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from storage.records import USAGE_COUNTS, UsageDelta
from worker.engine.api import Engine, EngineStats

FLUSH_S = 10.0  # how often figures go to the result sink (and at every hour boundary)


def _hour(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s - epoch_s % 3600, UTC)


@dataclass(frozen=True, slots=True)
class UsageReport:
    """What the engine loop hands the result sink every `FLUSH_S`."""

    deltas: list[UsageDelta]


class UsageMeter:
    """Snapshots each engine's counters; `take(now)` returns the change since the last take."""

    def __init__(self, worker: str, engines: dict[str, Engine]) -> None:
        self.worker, self.engines = worker, engines
        self._last: dict[str, EngineStats] = {n: e.stats() for n, e in engines.items()}
        self._since = time.time()

    def due(self, now: float) -> bool:
        return now - self._since >= FLUSH_S or _hour(now) != _hour(self._since)

    def take(self, now: float) -> UsageReport:
        """The interval since the last take, booked to the hour it started in."""
        wall, hour = now - self._since, _hour(self._since)
        deltas = []
        for name, engine in self.engines.items():
            new, old = engine.stats(), self._last[name]
            busy = new.busy_s - old.busy_s
            counts = {n: getattr(new, n) - getattr(old, n) for n in USAGE_COUNTS}
            deltas.append(
                UsageDelta(
                    self.worker,
                    name,
                    hour,
                    engine.device_class,
                    busy_s=busy,
                    idle_s=max(wall - busy, 0.0),
                    **counts,
                )
            )
            self._last[name] = new
        self._since = now
        return UsageReport(deltas)
