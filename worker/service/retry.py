"""Capped exponential backoff with jitter, for infrastructure trouble (database, broker)."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays 0.1 s, 0.2 s, ... up to `cap_s`, each with up to 50 % jitter; `reset` on success."""

    base_s: float = 0.1
    cap_s: float = 10.0
    failures: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.base_s * 2**self.failures)
        self.failures += 1
        return delay * (0.5 + self._rng.random() / 2)

    def wait(self, stop: threading.Event) -> bool:
        """Sleep the next delay; True if `stop` was set meanwhile."""
        return stop.wait(self.next_delay())

    def reset(self) -> None:
        self.failures = 0
