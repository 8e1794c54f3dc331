"""Retention on a schedule: every worker deletes, at start and then hourly, dead letters older
than `dead_letter_retention_days` and ended jobs (with their results and facts) older than
`retention_days` (each never when unset), in short batches on a thread of its own, so the
heartbeat and the intake never wait on it. Several workers doing it at once is harmless: a
row deleted by one is not there for the next."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from inferq.logs import get_logger
from inferq.settings import Settings
from storage.repository import Repository
from storage.retention import purge, purge_dead_letters
from worker.service.priority import as_helper_thread

log = get_logger("inferq.housekeeping")
EVERY_S = 3600.0


class Housekeeping:
    def __init__(self, settings: Settings, repo: Repository, every_s: float = EVERY_S):
        self.settings, self.repo, self.every_s = settings, repo, every_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="inferq-retention", daemon=True)

    @property
    def enabled(self) -> bool:
        s = self.settings
        return s.retention_days is not None or s.dead_letter_retention_days is not None

    def start(self) -> None:
        if self.enabled:
            self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        as_helper_thread()
        while True:
            try:
                self.purge()
            except Exception as exc:  # the next hour tries again
                log.warning("retention.failed", error=type(exc).__name__)
            if self._stop.wait(self.every_s):
                return

    def purge(self) -> None:
        """One pass: old dead letters, then old ended jobs."""
        s, now, engine = self.settings, datetime.now(UTC), self.repo.engine
        if s.dead_letter_retention_days is not None:
            before = now - timedelta(days=s.dead_letter_retention_days)
            letters = purge_dead_letters(engine, before)
            if letters:
                log.info("retention.dead_letters", deleted=letters)
        if s.retention_days is not None:
            purged = purge(engine, now - timedelta(days=s.retention_days))
            if purged.jobs or purged.batches or purged.dead_letters:
                log.info(
                    "retention.jobs",
                    jobs=purged.jobs,
                    batches=purged.batches,
                    dead_letters=purged.dead_letters,
                )
