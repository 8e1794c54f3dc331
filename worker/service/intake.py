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
from datetime import datetime
from typing import Any

from api_client.schema import JobMessage
from inferq.logs import get_logger
from inferq.settings import Settings
from storage.errors import is_transient
from storage.fleet import live_models
from storage.records import JobState, JobStatus, utcnow
from storage.repository import Repository
from worker.broker import Received, Source, open_source, prefix_key
from worker.engine.api import Codec
from worker.service.arrivals import JOB_ID_TAKEN, Arrival, bounded, claim_rounds, taken
from worker.service.dead_letters import DeadLetters
from worker.service.engine_loop import EngineLoop
from worker.service.jobs import Ledger, LiveJob
from worker.service.messages import Refusal, Trust, read_job
from worker.service.metrics import Metrics
from worker.service.outcomes import Failed
from worker.service.priority import as_helper_thread
from worker.service.retry import Backoff
from worker.service.unserved import GIVE_BACK_GAP_S, Unserved

log = get_logger("inferq.intake")
# How long one wait for messages lasts: acks are sent between waits, so they reach Redis up
# to this late (a full intake is woken by them at once); each wait's end wakes the thread,
# taking a core from the engine's (at 0.05 s: 20 wakes a second all through a busy row)
POLL_S = 0.25
FULL_WAIT_S = 1.0  # holding all it may: sleep this long at most between acknowledgements
MAX_GROUP = 256  # messages claimed in one transaction


#: Called with a group's arrivals and claimed states; returns the states to dispatch by.
Claimed = Callable[[list[Arrival], dict[uuid.UUID, JobState]], dict[uuid.UUID, JobState]]


@dataclass(frozen=True, slots=True)
class Served:
    """What the intake needs of one served model: its own tokenizer and the context size."""

    codec: Codec
    max_context: int


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
        claimed: Claimed | None = None,
    ):
        self.settings, self.repo, self.ledger = settings, repo, ledger
        self.engine_loop, self._fail = engine_loop, fail
        self.served, self.load_errors = served, load_errors
        self.worker, self.prefetch, self.metrics = worker, prefetch, metrics
        self._claimed = claimed  # sees each claim's states before anything is dispatched
        self.stream = settings.stream and settings.resolved_result_url is not None
        self.default_model = settings.model if settings.model in served else next(iter(served))
        self.trust = Trust.of(settings)  # a malformed or short key stops the worker here
        self.dead_letters = DeadLetters(repo, metrics, settings.dead_letters_per_minute)
        self.unserved = Unserved(
            worker,
            load_errors,
            settings.unserved_hold_s,
            lambda: live_models(repo, settings.worker_dead_after_s),
        )
        self._acks: queue.SimpleQueue[uuid.UUID] = queue.SimpleQueue()
        self._unacked: dict[uuid.UUID, list[Any]] = defaultdict(list)  # ack handles per job
        self._failed_acks: list[Any] = []  # handles to acknowledge once the broker is back
        self.ready = threading.Event()  # set while consuming (cleared when the broker fails)
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
                self.ready.clear()
                log.warning("intake.broker_unavailable", error=repr(exc))
                backoff.wait(stop)
                continue
            try:
                backoff.reset()
                self._consume(source, stop)
            except Exception as exc:  # the broker went away: reconnect; redelivery covers the rest
                self.ready.clear()
                log.warning("intake.broker_error", error=repr(exc))
                if not source.handles_outlive_connection:
                    self._unacked.clear()
                    self._failed_acks.clear()
                    self.unserved.forget()
                backoff.wait(stop)
            finally:
                source.close()

    def _consume(self, source: Source, stop: threading.Event) -> None:
        while not stop.is_set():
            self._flush_acks(source)
            source.tick(self._holding)
            if self.unserved.release(source):
                stop.wait(GIVE_BACK_GAP_S)  # a peer that serves them takes them meanwhile
            taking = self.taking.is_set() and not self.unserved.full
            room = self.prefetch - len(self._unacked) if taking else 0
            group = source.receive(min(room, MAX_GROUP), POLL_S) if room > 0 else []
            self.ready.set()  # the broker answered
            if group:
                self._handle(group, source, stop)
            elif room <= 0:  # full or draining: sleep until an outcome frees room
                self.wake.wait(FULL_WAIT_S)
                self.wake.clear()
        self._flush_acks(source)
        self.unserved.release(source, everything=True)
        held = self._holding()
        if held:
            self._release(list(self._unacked))
            source.requeue(held)
            log.info("intake.requeued", messages=len(held))
        self._unacked.clear()
        source.retire()

    def _release(self, job_ids: list[uuid.UUID]) -> None:
        """The jobs handed back go back to queued, their attempt not counted (the database
        away: the sweepers send them again instead)."""
        try:
            released = self.repo.release(job_ids, self.worker)
        except Exception as exc:
            log.warning("intake.release_failed", error=type(exc).__name__)
            return
        log.info("intake.released", jobs=released)

    def _holding(self) -> list[Any]:
        """The handles of the messages taken and not acknowledged yet."""
        return [h for handles in self._unacked.values() for h in handles]

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
            got = self._arrival(message, source, now)
            if isinstance(got, Refusal):
                dead.append((message, got))
            elif got is not None:
                arrivals.append(got)
        source.routed()
        states = self._store(arrivals, list(dead), stop)
        if states is None:
            return  # stopping while the database is away: the messages will come back
        if self._claimed is not None:
            states = self._claimed(arrivals, states)
        done = [m.handle for m, _ in dead]
        for arrival in arrivals:
            if not self._dispatch(arrival, states.get(arrival.row.id)):
                done.append(arrival.message.handle)
        source.ack(done)

    def _arrival(
        self, message: Received, source: Source, now: datetime
    ) -> Arrival | Refusal | None:
        """One message read, checked and tokenized (None: handed to the worker that owns its
        prefix). Nothing a message holds raises out of here: an error handling it refuses
        this message alone, never the others of its take."""
        job_id = None
        try:
            got = read_job(message, self.trust, now)
            if isinstance(got, Refusal):
                return got
            job_id = got.job_id
            arrival = self._prepare(message, bounded(got, now))
        except Exception as exc:
            log.error("intake.message_failed", error=type(exc).__name__)
            return Refusal("message handling failed", repr(exc), job_id)
        return None if self._forwarded(arrival, source) else arrival

    def _prepare(self, message: Received, job: JobMessage) -> Arrival:
        """Tokenize and check a valid job: the row to claim and the job to run, or the row
        and why it cannot run here."""
        row = job.to_job(self.default_model)
        prompt_ids, error = self._tokenize(row.model, job)
        live = None
        if error is None:
            live = LiveJob.from_job(
                job,
                prompt_ids,
                model=row.model,
                enqueued_at=row.enqueued_at,
                stream=self.stream,
                callback=job.callback_url is not None,
            )
        return Arrival(message, row, live, error)

    def _tokenize(self, model: str, job: JobMessage) -> tuple[list[int], str | None]:
        """The prompt's token ids, and why the job cannot run here (None: it can)."""
        error = self._model_error(model)
        if error is not None:
            return [], error
        served = self.served[model]
        messages = [m.model_dump() for m in job.messages] if job.messages else None
        try:
            prompt_ids = served.codec.encode(job.prompt, messages)
        except Exception as exc:
            return [], f"could not tokenize the input: {exc!r}"
        return prompt_ids, self._admission_error(served, len(prompt_ids), job.params.max_tokens)

    def _forwarded(self, arrival: Arrival, source: Source) -> bool:
        """Whether the message is not this worker's to run: handed to the worker whose prefix
        cache should serve it (prefix affinity), or, for a model not served here, to a worker
        that serves it or held to be given back (see `Unserved`). False: it runs or is
        refused here."""
        message, row, job = arrival.message, arrival.row, arrival.job
        if row.model not in self.served:
            key = f"{row.tenant}\0{row.id}".encode()
            return self.unserved.place(message, key, row.model, source)
        if job is None or message.routed:
            return False
        blocks = self.settings.affinity_blocks
        owner = source.owner(lambda: _routing_key(job, blocks), row.model)
        return owner is not None and owner != self.worker and source.forward(message, owner)

    def _model_error(self, model: str) -> str | None:
        if model in self.load_errors:
            return f"model {model!r} failed to load on this worker: {self.load_errors[model]}"
        if model not in self.served:
            return (
                f"unknown model {model!r}: no live worker serves it (this one serves "
                f"{sorted(self.served)})"
            )
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
        self, arrivals: list[Arrival], dead: list[tuple[Received, Refusal]], stop: threading.Event
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
                log.warning(
                    "intake.store_failed", retry=backoff.failures + 1, error=type(exc).__name__
                )
                if backoff.wait(stop):
                    return None

    def _claim(
        self, arrivals: list[Arrival], dead: list[tuple[Received, Refusal]]
    ) -> dict[uuid.UUID, JobState]:
        """Dead letters first, then the claim; a message whose job id is a stored job of other
        content (another tenant's) is refused as a dead letter ("job id taken")."""
        for message, refusal in dead:
            self.dead_letters.record(message, refusal)
        dead.clear()  # stored: not again on a retry
        states: dict[uuid.UUID, JobState] = {}
        for claim in claim_rounds(arrivals):  # one content per job id in each claim
            new = [a.row for a in claim]
            refused = {a.row.id: a.error for a in claim if a.error is not None}
            live_for_s = self.settings.worker_dead_after_s
            states.update(self.repo.claim(new, self.worker, refused, live_for_s=live_for_s))
        for arrival in arrivals:
            if taken(arrival, states.get(arrival.row.id)):
                refusal = Refusal(
                    JOB_ID_TAKEN,
                    "the job id is a job of other content or another tenant",
                    arrival.row.id,
                )
                self.dead_letters.record(arrival.message, refusal)
        return states

    def _claim_apart(
        self, arrivals: list[Arrival], dead: list[tuple[Received, Refusal]]
    ) -> dict[uuid.UUID, JobState]:
        """One by one; a job the database refuses becomes a dead letter (not retried)."""
        for message, refusal in dead:
            self.dead_letters.record(message, refusal, last_try=True)
        dead.clear()
        states: dict[uuid.UUID, JobState] = {}
        for arrival in arrivals:
            try:
                states.update(self._claim([arrival], []))
            except Exception as exc:
                if is_transient(exc):
                    raise
                refusal = Refusal("job refused by the database", type(exc).__name__, arrival.row.id)
                self.dead_letters.record(arrival.message, refusal, last_try=True)
        return states

    def _dispatch(self, arrival: Arrival, state: JobState | None) -> bool:
        """Run a job claimed for this worker (True: its message waits for the outcome), or
        say that the message has nothing left to run (False: acknowledge it now)."""
        job_id, handle, job = arrival.row.id, arrival.message.handle, arrival.job
        if taken(arrival, state):
            return False  # refused, kept as a dead letter by `_claim`
        if job_id in self.ledger:  # delivered again while it runs here: ack with the first
            self._unacked[job_id].append(handle)
            return True
        if (
            state is None
            or state.id != job_id
            or state.status != JobStatus.RUNNING
            or state.worker != self.worker
            or job is None
        ):
            if arrival.error:
                log.warning("job.refused", job_id=str(job_id), error=arrival.error)
            # a repeated idempotency key, finished, cancelled, refused, or running live on
            # another worker (which holds its own message; the sweeper resends if it dies)
            return False
        self._unacked[job_id].append(handle)
        if state.attempts > self.settings.max_attempts:
            self._fail(
                Failed(
                    job_id,
                    f"gave up after {state.attempts - 1} attempts (a worker died running it)",
                    job.model,
                )
            )
            return True
        self.ledger.add(job)
        self.engine_loop.submit(job, state.expires_at)  # the stored deadline, not the message's
        return True


def _routing_key(job: LiveJob, blocks: int) -> bytes | None:
    """The prefix-affinity key of a job; None (it runs where it is) if it cannot be made."""
    try:
        return prefix_key(job.tenant, job.model, job.prompt_ids, blocks=blocks)
    except Exception as exc:
        log.warning("intake.routing_key_failed", error=type(exc).__name__)
        return None
