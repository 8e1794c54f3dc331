"""The webhook sender: a dispatcher thread claims due deliveries and hands each to one of
`webhook_senders` sender threads, which POST it and record the attempt.

The result sink never waits on it: the outbox row is written in the sink's own transaction
(`storage.webhooks.enqueue`), and after a commit that may owe a webhook the worker only calls
`wake()` (an event).
Between wakes the dispatcher sleeps until the next pending delivery is due (a retry, a dead
worker's lease: the database's clock says when), at most `webhook_poll_s` (deliveries of jobs
that ended on a worker that died before sending them). A delivery is claimed only when a sender
thread is free for it, so its lease runs while it is being sent.
"""

from __future__ import annotations

import queue
import random
import threading
import time

from standardwebhooks import Webhook

from inferq.logs import get_logger
from inferq.settings import Settings
from storage.errors import is_transient
from storage.repository import Repository
from storage.webhooks import Claimed, Deliveries, Outcome
from worker.service.metrics import Metrics
from worker.service.priority import as_helper_thread
from worker.service.retry import Backoff, backoff_delay
from worker.webhooks.delivery import attempt, lease_for

log = get_logger("inferq.webhooks")
STOP_JOIN_S = 1.0  # in all; a sender in a slow POST is left: its lease ends, another sends
RACED_WAIT_S = 0.5  # a due delivery another worker was claiming: look again this soon


class WebhookSender:
    """`start()`, `wake()` after commits, `stop()`."""

    def __init__(
        self, settings: Settings, repo: Repository, worker: str, metrics: Metrics | None = None
    ):
        self.settings, self.worker, self.metrics = settings, worker, metrics
        self.deliveries = Deliveries(repo)
        self.policy = settings.webhook_policy()
        self.signers = {
            tenant: tuple(Webhook(s) for s in secrets)
            for tenant, secrets in settings.webhook_signing_secrets().items()
        }
        self.lease_s = lease_for(settings.webhook_timeout_s)
        self._rng = random.Random()
        self._work: queue.SimpleQueue[Claimed | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._free = settings.webhook_senders
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._dispatch, name="inferq-webhooks", daemon=True)
        self._senders = [
            threading.Thread(target=self._send_loop, name=f"inferq-webhook-{n}", daemon=True)
            for n in range(settings.webhook_senders)
        ]

    def start(self) -> None:
        for t in self._senders:
            t.start()
        self.thread.start()

    def wake(self) -> None:
        """Look for due deliveries now (this worker just committed some job ends)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for _ in self._senders:
            self._work.put(None)
        deadline = time.monotonic() + STOP_JOIN_S
        for t in (self.thread, *self._senders):
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    def _slots(self, taken: int) -> None:
        with self._lock:
            self._free -= taken

    def _dispatch(self) -> None:
        as_helper_thread()
        backoff = Backoff(cap_s=max(10.0, self.settings.webhook_poll_s))
        while not self._stop.is_set():
            self._wake.clear()
            with self._lock:
                free = self._free
            wait_s = self.settings.webhook_poll_s  # all senders busy: one that ends wakes this
            if free > 0:
                try:
                    due_in = self.deliveries.due_in_s()
                    due = due_in == 0
                    claimed = self.deliveries.claim(self.worker, free, self.lease_s) if due else []
                except Exception as exc:  # the database is away: try again later
                    log.warning("webhooks.claim_failed", error=type(exc).__name__)
                    if self.metrics is not None:
                        self.metrics.retries.labels("webhooks").inc()
                    if backoff.wait(self._stop):
                        return
                    continue
                backoff.reset()
                self._slots(len(claimed))
                for c in claimed:
                    self._work.put(c)
                if claimed:
                    continue  # look again: more may be due, or when the next is
                wait_s = _wait_s(due_in, wait_s)
            self._wake.wait(wait_s)

    def _send_loop(self) -> None:
        as_helper_thread()
        while (claimed := self._work.get()) is not None:
            try:
                self._deliver(claimed)
            except Exception as exc:  # never seen; the lease ends and it is sent again
                log.error(
                    "webhooks.send_failed", delivery_id=str(claimed.id), error=type(exc).__name__
                )
            finally:
                self._slots(-1)
                self._wake.set()

    def _deliver(self, claimed: Claimed) -> None:
        s = self.settings
        signers = self.signers.get(claimed.tenant, ())
        outcome = attempt(claimed, self.policy, signers, s.webhook_timeout_s)
        delay = backoff_delay(
            claimed.attempt - 1, s.webhook_backoff_s, s.webhook_backoff_cap_s, self._rng
        )
        state = self._record(claimed, outcome, delay)
        if self.metrics is not None:
            self.metrics.webhook_attempts.labels(outcome.status).inc()
        log.info(
            "webhook.attempt",
            delivery_id=str(claimed.id),
            job_id=str(claimed.job_id),
            attempt=claimed.attempt,
            status=outcome.status,
            http_status=outcome.http_status,
            latency_ms=outcome.latency_ms,
            error=outcome.error,
            delivery=state,
        )

    def _record(self, claimed: Claimed, outcome: Outcome, delay: float) -> str | None:
        """Write the attempt, retrying while the database is away (until stopped: then the
        lease ends and the delivery is sent again)."""
        backoff = Backoff()
        while True:
            try:
                return self.deliveries.record(
                    claimed,
                    outcome,
                    self.worker,
                    retry_in_s=delay,
                    retry_for_s=self.settings.webhook_retry_for_s,
                )
            except Exception as exc:
                log.warning(
                    "webhooks.record_failed", delivery_id=str(claimed.id), error=type(exc).__name__
                )
                if not is_transient(exc):  # fails the same way again: the lease will end
                    return None
                if self.metrics is not None:
                    self.metrics.retries.labels("webhooks").inc()
                if backoff.wait(self._stop):
                    return None


def _wait_s(due_in: float | None, poll_s: float) -> float:
    """How long the dispatcher sleeps after a look that claimed nothing: until the next
    delivery is due (at most a poll), or a moment when one was due but another worker's claim
    held it (its lease moves it on once that claim commits)."""
    if due_in is None:
        return poll_s
    return min(poll_s, due_in if due_in > 0 else RACED_WAIT_S)
