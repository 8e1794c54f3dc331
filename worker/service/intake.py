"""The intake: consumes the job queue, validates and tokenizes each job with tokenizers it
owns, claims the job rows in one transaction per gathered group, and hands runnable jobs to
the engine loop. A message is acknowledged only once its job's outcome is committed, so a
killed worker loses nothing: its unacknowledged messages are delivered again.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from api_client.schema import JobMessage
from inferq.logs import get_logger
from inferq.settings import Settings
from storage.errors import is_transient
from storage.records import JobState, JobStatus, as_utc, utcnow
from storage.repository import Repository
from worker.engine.api import Codec, EngineRequest, SamplingParams
from worker.service.affinity import prefix_key
from worker.service.engine_loop import EngineLoop
from worker.service.jobs import Ledger, LiveJob
from worker.service.messages import Refusal, dead_letter_payload, read_job
from worker.service.metrics import Metrics
from worker.service.outcomes import Failed
from worker.service.priority import as_helper_thread
from worker.service.retry import Backoff
from worker.service.sources import Received, Source, open_source

ENQUEUE_LOOKBACK = timedelta(days=7)  # an older producer clock is taken as this old
log = get_logger("inferq.intake")
POLL_S = 0.05  # how long one wait for messages lasts (acks are sent between waits)
FULL_WAIT_S = 1.0  # holding all it may: sleep this long at most between acknowledgements
MAX_GROUP = 256  # messages claimed in one transaction


@dataclass(frozen=True, slots=True)
class Served:
    """What the intake needs of one served model: its own tokenizer and the context size."""

    codec: Codec
    max_context: int


@dataclass(slots=True)
class _Arrival:
    message: Received
    job: JobMessage
    model: str
    request: EngineRequest | None  # None when refused (see `error`)
    error: str | None


class Intake:
    """Runs on its own thread (`run`); `acknowledge` is safe from any thread."""

    def __init__(
        self,
        settings: Settings,
        repo: Repository,
        ledger: Ledger,
        engine_loop: EngineLoop,
        fail: Callable[[Failed], None],
        served: dict[str, Served],
        load_errors: dict[str, str],
        worker: str,
        prefetch: int,
        metrics: Metrics,
    ):
        self.settings, self.repo, self.ledger = settings, repo, ledger
        self.engine_loop, self._fail = engine_loop, fail
        self.served, self.load_errors = served, load_errors
        self.worker, self.prefetch, self.metrics = worker, prefetch, metrics
        self.default_model = settings.model if settings.model in served else next(iter(served))
        self.signing_keys = settings.signing_keys()
        self._acks: queue.SimpleQueue[uuid.UUID] = queue.SimpleQueue()
        self._unacked: dict[uuid.UUID, list[Any]] = defaultdict(list)  # ack handles per job
        self._failed_acks: list[Any] = []  # handles to acknowledge once the broker is back
        self.ready = threading.Event()  # set once consuming
        self.taking = threading.Event()  # cleared to stop taking messages (a drain)
        self.taking.set()
        self.wake = threading.Event()  # set by acknowledgements (room) and by a stop

    def acknowledge(self, job_ids: list[uuid.UUID]) -> None:
        for job_id in job_ids:
            self._acks.put(job_id)
        self.wake.set()

    # -- the consumer loop ---------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; broker trouble is retried with backoff."""
        as_helper_thread()
        backoff = Backoff()
        while not stop.is_set():
            try:
                source = open_source(self.settings, self.worker, list(self.served))
            except Exception as exc:
                log.warning("intake.broker_unavailable", error=repr(exc))
                backoff.wait(stop)
                continue
            try:
                backoff.reset()
                self.ready.set()
                self._consume(source, stop)
            except Exception as exc:  # the broker went away: reconnect; redelivery covers the rest
                log.warning("intake.broker_error", error=repr(exc))
                if not source.handles_outlive_connection:
                    self._unacked.clear()
                    self._failed_acks.clear()
                backoff.wait(stop)
            finally:
                source.close()

    def _consume(self, source: Source, stop: threading.Event) -> None:
        while not stop.is_set():
            self._flush_acks(source)
            source.tick()
            room = self.prefetch - len(self._unacked) if self.taking.is_set() else 0
            group = source.receive(min(room, MAX_GROUP), POLL_S) if room > 0 else []
            if group:
                self._handle(group, source, stop)
            elif room <= 0:  # full or draining: sleep until an outcome frees room
                self.wake.wait(FULL_WAIT_S)
                self.wake.clear()
        self._flush_acks(source)
        held = [h for handles in self._unacked.values() for h in handles]
        if held:
            source.requeue(held)
            log.info("intake.requeued", messages=len(held))
        self._unacked.clear()
        source.retire()

    def _flush_acks(self, source: Source) -> None:
        handles, self._failed_acks = self._failed_acks, []
        while True:
            try:
                job_id = self._acks.get_nowait()
            except queue.Empty:
                break
            handles += self._unacked.pop(job_id, ())
        if handles:
            try:
                source.ack(handles)
            except Exception:
                self._failed_acks = handles  # kept for the next connection
                raise

    # -- one group of messages -------------------------------------------------------------

    def _handle(self, messages: list[Received], source: Source, stop: threading.Event) -> None:
        arrivals, dead, now = [], [], utcnow()
        for message in messages:
            got = read_job(message, self.signing_keys)
            if isinstance(got, Refusal):
                dead.append((message, got))
                continue
            sent = got.submitted_at and as_utc(got.submitted_at)
            if sent is not None and not now - ENQUEUE_LOOKBACK <= sent <= now:
                bounded = min(max(sent, now - ENQUEUE_LOOKBACK), now)  # a producer's clock
                got = got.model_copy(update={"submitted_at": bounded})  # within bounds only
            arrival = self._prepare(message, got)
            if not self._forwarded(arrival, source):
                arrivals.append(arrival)
        states = self._store(arrivals, list(dead), stop)
        if states is None:
            return  # stopping while the database is away: the messages will come back
        done = [m.handle for m, _ in dead]
        for arrival in arrivals:
            if not self._dispatch(arrival, states.get(arrival.job.job_id)):
                done.append(arrival.message.handle)
        source.ack(done)

    def _prepare(self, message: Received, job: JobMessage) -> _Arrival:
        """Tokenize and check a valid job; a refusal keeps the reason."""
        model = job.model or self.default_model
        error = self._model_error(model)
        if error is not None:
            return _Arrival(message, job, model, None, error)
        served = self.served[model]
        messages = [m.model_dump() for m in job.messages] if job.messages else None
        try:
            prompt_ids = served.codec.encode(job.prompt, messages)
        except Exception as exc:
            return _Arrival(message, job, model, None, f"could not tokenize the input: {exc!r}")
        error = self._admission_error(served, len(prompt_ids), job.params.max_tokens)
        if error is not None:
            return _Arrival(message, job, model, None, error)
        p = job.params
        params = SamplingParams(
            p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, tuple(p.stop)
        )
        request = EngineRequest(str(job.job_id), prompt_ids, params, job.tenant, job.priority)
        return _Arrival(message, job, model, request, None)

    def _forwarded(self, arrival: _Arrival, source: Source) -> bool:
        """Hand a job taken from the shared queue to the worker whose prefix cache should
        serve it (prefix affinity); False: it runs here."""
        message, request = arrival.message, arrival.request
        if request is None or message.routed:
            return False
        blocks = self.settings.affinity_blocks
        owner = source.owner(
            lambda: prefix_key(request.tenant, arrival.model, request.prompt_ids, blocks=blocks),
            arrival.model,
        )
        return owner is not None and owner != self.worker and source.forward(message, owner)

    def _model_error(self, model: str) -> str | None:
        if model in self.load_errors:
            return f"model {model!r} failed to load on this worker: {self.load_errors[model]}"
        if model not in self.served:
            return f"unknown model {model!r}: this worker serves {sorted(self.served)}"
        return None

    def _admission_error(self, served: Served, prompt_tokens: int, max_tokens: int) -> str | None:
        s = self.settings
        if prompt_tokens == 0:
            return "prompt is empty after tokenization"
        if prompt_tokens > s.max_prompt_tokens:
            return f"prompt has {prompt_tokens} tokens; the limit is {s.max_prompt_tokens}"
        if max_tokens > s.max_new_tokens:
            return f"max_tokens {max_tokens} exceeds this worker's limit {s.max_new_tokens}"
        if prompt_tokens + max_tokens > served.max_context:
            return (
                f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {served.max_context} tokens"
            )
        return None

    def _store(
        self, arrivals: list[_Arrival], dead: list[tuple[Received, Refusal]], stop: threading.Event
    ) -> dict[uuid.UUID, JobState] | None:
        """Dead letters and the claim, retried with backoff while the database is away; what
        the database refuses (not transient) is stored apart so one bad job fails alone."""
        backoff = Backoff()
        while True:
            try:
                try:
                    return self._claim(arrivals, dead)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    log.warning("intake.group_refused", error=type(exc).__name__)
                    return self._claim_apart(arrivals, dead)
            except Exception as exc:
                self.metrics.retries.labels("intake").inc()
                log.warning("intake.store_failed", retry=backoff.failures + 1,
                            error=type(exc).__name__)  # fmt: skip
                if backoff.wait(stop):
                    return None

    def _claim(
        self, arrivals: list[_Arrival], dead: list[tuple[Received, Refusal]]
    ) -> dict[uuid.UUID, JobState]:
        for message, refusal in dead:
            self._dead_letter(message, refusal)
        dead.clear()  # stored: not again on a retry
        new = [a.job.to_job(a.model) for a in arrivals]
        refused = {a.job.job_id: a.error for a in arrivals if a.error is not None}
        return self.repo.claim(new, self.worker, refused)

    def _claim_apart(
        self, arrivals: list[_Arrival], dead: list[tuple[Received, Refusal]]
    ) -> dict[uuid.UUID, JobState]:
        """One by one; a job the database refuses becomes a dead letter (not retried)."""
        for message, refusal in dead:
            self._dead_letter(message, refusal, last_try=True)
        dead.clear()
        states: dict[uuid.UUID, JobState] = {}
        for arrival in arrivals:
            try:
                states.update(self._claim([arrival], []))
            except Exception as exc:
                if is_transient(exc):
                    raise
                refusal = Refusal("job refused by the database", type(exc).__name__,
                                  arrival.job.job_id)  # fmt: skip
                self._dead_letter(arrival.message, refusal, last_try=True)
        return states

    def _dead_letter(self, message: Received, refusal: Refusal, last_try: bool = False) -> None:
        """Keep a message that cannot run; on the last try, one the database refuses even
        as a dead letter is logged (without its content) and dropped."""
        try:
            self.repo.record_dead_letter(
                refusal.reason, dead_letter_payload(message), refusal.error, job_id=refusal.job_id
            )
        except Exception as exc:
            if is_transient(exc) or not last_try:
                raise
            log.error("message.dropped", reason=refusal.reason, error=type(exc).__name__)
            return
        self.metrics.dead_letters.labels(refusal.reason).inc()
        log.error("message.dead_letter", reason=refusal.reason, job_id=str(refusal.job_id))

    def _dispatch(self, arrival: _Arrival, state: JobState | None) -> bool:
        """Run a claimed job (True: its message waits for the outcome), or say that the
        message has nothing left to run (False: acknowledge it now)."""
        job_id, handle = arrival.job.job_id, arrival.message.handle
        if job_id in self.ledger:  # delivered again while it runs here: ack with the first
            self._unacked[job_id].append(handle)
            return True
        if state is None or state.id != job_id or state.status != JobStatus.RUNNING:
            if arrival.error:
                log.warning("job.refused", job_id=str(job_id), error=arrival.error)
            return False  # a repeated idempotency key, finished or cancelled, or refused
        self._unacked[job_id].append(handle)
        if state.attempts > self.settings.max_attempts:
            self._fail(Failed(job_id, f"gave up after {state.attempts - 1} attempts "
                              "(a worker died running it)", arrival.model))  # fmt: skip
            return True
        assert arrival.request is not None
        sent = arrival.job.submitted_at
        job = LiveJob(
            job_id, arrival.model, arrival.request, sent and as_utc(sent),
            arrival.job.expires_at,
        )  # fmt: skip
        self.ledger.add(job)
        self.engine_loop.submit(job)
        return True
