"""Capped exponential backoff with jitter: for infrastructure trouble (database, broker) and
for webhook retries."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

MAX_DOUBLINGS = 64  # 2**64 times any base is past any cap


def backoff_delay(failures: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """The delay after `failures` failures in a row (0: after the first): `base_s` doubled
    per failure up to `cap_s`, then a random part of up to half of it taken off (so it lies
    in [half, all] of the capped delay: waiters spread out, none waits past the cap)."""
    delay = min(cap_s, base_s * 2 ** min(max(failures, 0), MAX_DOUBLINGS))
    return delay * (0.5 + rng.random() / 2)


@dataclass
class Backoff:
    """Delays 0.1 s, 0.2 s, ... up to `cap_s`, each with up to 50 % jitter; `reset` on success."""

    base_s: float = 0.1
    cap_s: float = 10.0
    failures: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        delay = backoff_delay(self.failures, self.base_s, self.cap_s, self._rng)
        self.failures += 1
        return delay

    def wait(self, stop: threading.Event) -> bool:
        """Sleep the next delay; True if `stop` was set meanwhile."""
        return stop.wait(self.next_delay())

    def reset(self) -> None:
        self.failures = 0
