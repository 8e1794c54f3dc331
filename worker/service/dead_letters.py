"""Dead letters, bounded: in each minute the first `per_minute` messages refused for a reason
are kept whole; later ones of that reason fold into one row for the minute (how many, and
the SHA-256 of each body, its job id and its claimed source, the first `FOLD_LISTED` of them),
so a flood costs a row per reason and minute, not 64 KB per message. The Prometheus counter
still counts every message. Each write commits before its message is acknowledged."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from inferq.logs import get_logger
from storage.errors import is_transient
from storage.repository import Repository
from worker.broker import Received, dead_letter_payload, raw_body, sender
from worker.service.messages import Refusal
from worker.service.metrics import Metrics

log = get_logger("inferq.dead_letters")
WINDOW_S = 60.0
FOLD_LISTED = 100  # SHA-256s and job ids a folded row lists
MAX_SOURCES = 16  # distinct sources a folded row counts apart; the rest count as "other"


@dataclass(frozen=True, slots=True)
class _Fold:
    """One folded row: the messages of one reason past the whole ones, this minute."""

    row_id: int | None = None
    count: int = 0
    sha256: tuple[str, ...] = ()
    job_ids: tuple[str, ...] = ()
    sources: dict[str, int] = field(default_factory=dict)

    def add(self, message: Received, refusal: Refusal) -> _Fold:
        listed = self.count < FOLD_LISTED
        sha = hashlib.sha256(raw_body(message)).hexdigest()
        source = sender(message)
        if source not in self.sources and len(self.sources) >= MAX_SOURCES:
            source = "other"
        job_id = (str(refusal.job_id),) if listed and refusal.job_id else ()
        return replace(
            self,
            count=self.count + 1,
            sha256=self.sha256 + ((sha,) if listed else ()),
            job_ids=self.job_ids + job_id,
            sources={**self.sources, source: self.sources.get(source, 0) + 1},
        )

    def payload(self) -> dict[str, Any]:
        return {
            "folded": self.count,
            "sha256": list(self.sha256),
            "job_ids": list(self.job_ids),
            "sources": self.sources,
        }


class DeadLetters:
    """Keeps the intake's refused messages (one thread uses it)."""

    def __init__(
        self,
        repo: Repository,
        metrics: Metrics,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.repo, self.metrics, self.per_minute, self._clock = repo, metrics, per_minute, clock
        self._window = clock()
        self._whole: Counter[str] = Counter()
        self._folds: dict[str, _Fold] = {}

    def record(self, message: Received, refusal: Refusal, last_try: bool = False) -> None:
        """Keep one refused message; on the last try, one the database refuses even as a
        dead letter is logged (without its content) and dropped."""
        try:
            self._store(message, refusal)
        except Exception as exc:
            if is_transient(exc) or not last_try:
                raise
            log.error("message.dropped", reason=refusal.reason, error=type(exc).__name__)
            return
        self.metrics.dead_letters.labels(refusal.reason).inc()
        log.error("message.dead_letter", reason=refusal.reason, job_id=str(refusal.job_id))

    def _store(self, message: Received, refusal: Refusal) -> None:
        if self._clock() - self._window >= WINDOW_S:
            self._window, self._whole, self._folds = self._clock(), Counter(), {}
        reason = refusal.reason
        if self._whole[reason] < self.per_minute:
            payload = dead_letter_payload(message)
            self.repo.record_dead_letter(reason, payload, refusal.error, job_id=refusal.job_id)
            self._whole[reason] += 1
            return
        fold = self._folds.get(reason, _Fold()).add(message, refusal)
        error = (
            f"{fold.count} more messages refused for this reason within a minute, kept "
            f"folded; the last one's error: {refusal.error}"
        )
        if fold.row_id is None:
            row_id = self.repo.record_dead_letter(reason, fold.payload(), error, job_id=None)
            fold = replace(fold, row_id=row_id)
        else:
            self.repo.rewrite_dead_letter(fold.row_id, fold.payload(), error)
        self._folds[reason] = fold  # only once written: a failed write is folded again
