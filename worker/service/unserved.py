"""Jobs for a model this worker does not serve. Such a job is never failed while some worker
should run it: on Redis with affinity it goes straight to a live peer that serves the model;
else, when a live worker serves it (workers table, by the database's clock) or this worker
was told to serve it and failed to load it, its message is held a moment (so a lone worker
does not spin on it) and given back to the queue unclaimed, its job row untouched. Only a
model no worker serves is refused ("unknown model"). A message given back goes to the front
of its queue, so the worker that gave it back takes none for a moment: any peer (idle ones
poll at least every 0.25 s) takes it first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from inferq.logs import get_logger
from worker.broker import Received, Source

log = get_logger("inferq.intake")
FLEET_VIEW_S = 1.0  # how long one read of the live workers' models is used
MAX_HELD = 8192  # held messages beyond this stop the intake from taking more
GIVE_BACK_GAP_S = 0.5  # after giving messages back, take none for this long


class Unserved:
    """Owned by the intake thread: `place` messages, `release` them when due."""

    def __init__(
        self,
        worker: str,
        failed: Iterable[str],
        hold_s: float,
        fleet: Callable[[], set[str]],
    ) -> None:
        self.worker, self.failed, self.hold_s = worker, frozenset(failed), hold_s
        self._fleet, self._looked = fleet, -FLEET_VIEW_S
        self._models: frozenset[str] | None = None  # None: the database could not tell
        self._held: list[Any] = []  # handles, given back together
        self._due = 0.0  # when the first held message is to go back (monotonic)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def full(self) -> bool:
        return len(self._held) >= MAX_HELD

    def place(self, message: Received, key: bytes, model: str, source: Source) -> bool:
        """Send or hold a message for `model` (not served here); False: nobody serves it
        (or it cannot be given back: no delivery tag)."""
        if message.handle is None:
            return False
        if not message.routed:  # a routed one goes back to the shared queue
            owner = source.owner(lambda: key, model)
            if owner not in (None, self.worker) and source.forward(message, owner):
                log.debug("intake.unserved_forwarded", model=model, to=owner)
                return True
        if model not in self.failed and not self._served_elsewhere(model):
            return False
        if not self._held:
            self._due = time.monotonic() + self.hold_s
        self._held.append(message.handle)
        return True

    def _served_elsewhere(self, model: str) -> bool:
        """Whether a live worker serves `model`, from a view read at most every FLEET_VIEW_S;
        True while the database cannot tell (holding is safe, refusing is not)."""
        now = time.monotonic()
        if now - self._looked >= FLEET_VIEW_S:
            self._looked = now
            try:
                self._models = frozenset(self._fleet())
            except Exception as exc:
                log.warning("intake.fleet_unknown", error=type(exc).__name__)
                self._models = None
        return self._models is None or model in self._models

    def release(self, source: Source, everything: bool = False) -> bool:
        """Once the first held message has waited `hold_s` (or for `everything`), give every
        held message back to the queue; whether any went (then take none for a moment)."""
        if not self._held or not (everything or time.monotonic() >= self._due):
            return False
        source.requeue(self._held)
        log.debug("intake.unserved_given_back", messages=len(self._held))
        self._held = []
        return True

    def forget(self) -> None:
        """The connection that held them is gone (and with it, the messages went back)."""
        self._held.clear()
