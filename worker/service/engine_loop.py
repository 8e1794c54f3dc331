"""The engine loop: the only thread that touches the engines. It adds, aborts and steps;
it never does I/O. Other threads talk to it through its inbox of typed messages (`Add`,
`Abort`, `Stop`); finished and failed jobs go to the result sink."""

from __future__ import annotations

import heapq
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from inferq.logs import get_logger
from worker.engine.api import Engine, EngineOutput, EngineStats, TextDelta, run_to_completion
from worker.service.jobs import LiveJob
from worker.service.metrics import Metrics
from worker.service.outcomes import Dropped, Failed, Finished, Outcome
from worker.service.usage import UsageMeter

log = get_logger("inferq.engine_loop")
IDLE_WAIT_S = 0.1
DEADLINE_SLACK = 64  # finished jobs' heap entries tolerated beyond the live ones


@dataclass(frozen=True, slots=True)
class Add:
    """Run `job`; drop it (expired) if it is still live at `expires_at`."""

    job: LiveJob
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop the job `job_id` wherever it is (it was cancelled); its compute is still billed."""

    job_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Stop:
    """End `run` once the messages before it are applied; what is live is aborted."""


Message = Add | Abort | Stop


def _always() -> bool:
    return True


class EngineLoop:
    """Steps every engine that has work, round robin; `submit`/`abort`/`stop` from any
    thread."""

    def __init__(
        self,
        engines: dict[str, Engine],
        emit: Callable[[Outcome], None],
        metrics: Metrics,
        worker: str = "",
        stream: Callable[[list[TextDelta]], None] | None = None,
    ):
        self.engines, self._emit, self.metrics, self.worker = engines, emit, metrics, worker
        self._stream = stream  # each step's text deltas (streaming jobs), when set
        self._computed = dict.fromkeys(engines, 0)  # tokens computed so far, per model
        self._deadlines: list[tuple[float, str, uuid.UUID]] = []  # heap: (epoch s, model, id)
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._live: dict[str, dict[uuid.UUID, LiveJob]] = {name: {} for name in engines}
        self._stopped = False
        self.progress_at = time.monotonic()  # the last step that computed, or an idle turn
        self.thread = threading.Thread(target=self.run, name="inferq-engine", daemon=True)

    def start(self) -> None:
        """Run on a thread of its own (see `run` for the faster way)."""
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End `run` after the messages sent before; wait for the loop's own thread (if it
        was started)."""
        self._inbox.put(Stop())
        if self.thread.ident is not None:
            self.thread.join(timeout)

    def submit(self, job: LiveJob, expires_at: datetime | None = None) -> None:
        self._inbox.put(Add(job, expires_at))

    def abort(self, job_id: uuid.UUID) -> None:
        self._inbox.put(Abort(job_id))

    def run(self, keep_going: Callable[[], bool] = _always) -> None:
        """Step the engines on the calling thread while `keep_going()`, until a `Stop`. On
        CPU, torch's bf16 matmuls use both cores fully only on the main thread (measured:
        1.99 vs 1.36 CPU seconds per second elsewhere), so `inferq worker` runs the loop
        there."""
        meter = UsageMeter(self.worker, self.engines)
        while keep_going():
            busy = any(engine.has_work for engine in self.engines.values())
            self._take(wait=0.0 if busy else IDLE_WAIT_S)
            if self._stopped:
                break
            now = time.time()
            self._expire(now)
            for name, engine in self.engines.items():
                if engine.has_work:
                    self._step(name, engine)
            if not busy:
                self.progress_at = time.monotonic()
            if meter.due(now):
                self._emit(meter.take(now))
        self._emit(meter.take(time.time()))
        for name, live in self._live.items():  # stopped: what is left goes back to the queue
            for job_id in live:
                self.engines[name].abort(job_id)
            live.clear()

    def _take(self, wait: float) -> None:
        """Apply the queued messages up to a `Stop`; wait up to `wait` for the first."""
        try:
            message = self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            match message:
                case Add(job, expires_at):
                    self._add(job, expires_at)
                case Abort(job_id):
                    self._abort(job_id)
                case Stop():
                    self._stopped = True
                    return
                case _:
                    raise TypeError(f"not an engine-loop message: {type(message).__name__}")
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, job: LiveJob, expires_at: datetime | None) -> None:
        try:
            self.engines[job.model].add(job)
        except ValueError as exc:
            self._emit(Failed(job.seq_id, f"cannot run: {exc}", job.model))
            return
        self._live[job.model][job.seq_id] = job
        if expires_at is not None:
            heapq.heappush(self._deadlines, (expires_at.timestamp(), job.model, job.seq_id))

    def _expire(self, now: float) -> None:
        """Drop live jobs whose deadline has passed (waiting or running); forget the deadlines
        of jobs that left, so the heap holds about as many entries as there are live jobs."""
        live = sum(len(jobs) for jobs in self._live.values())
        if len(self._deadlines) > 2 * live + DEADLINE_SLACK:
            self._deadlines = [d for d in self._deadlines if d[2] in self._live[d[1]]]
            heapq.heapify(self._deadlines)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, model, job_id = heapq.heappop(self._deadlines)
            if self._live[model].pop(job_id, None) is not None:
                spent = self.engines[model].abort(job_id)
                error = "its deadline passed before it finished"
                self._emit(Failed(job_id, error, model, expired=True, compute_s=spent))

    def _abort(self, job_id: uuid.UUID) -> None:
        for name, live in self._live.items():
            if live.pop(job_id, None) is not None:
                self._emit(Dropped(job_id, name, self.engines[name].abort(job_id)))

    def _step(self, name: str, engine: Engine) -> None:
        try:
            outputs = engine.step()
        except Exception as exc:
            self._isolate(name, engine, exc)
            return
        stats = engine.stats()
        computed = stats.computed_tokens - self._computed[name]
        self.metrics.engine_step(name, stats, computed)
        self._computed[name] = stats.computed_tokens
        if computed or outputs:
            self.progress_at = time.monotonic()
        if self._stream is not None and (deltas := engine.deltas()):
            self._stream(deltas)
        for out in outputs:
            self._emit(self._outcome(name, self._live[name].pop(out.seq_id), out, stats))

    @staticmethod
    def _outcome(name: str, job: LiveJob, out: EngineOutput, stats: EngineStats) -> Outcome:
        """A finished sequence's outcome: Failed when the engine ended it with an error."""
        if out.error is not None:
            return Failed(job.seq_id, f"engine error: {out.error}", name, compute_s=out.compute_s)
        return Finished(job, out, stats)

    def _isolate(self, name: str, engine: Engine, exc: Exception) -> None:
        """A step raised: rerun its live jobs apart (bisecting) so only the culprit fails."""
        live = self._live[name]
        jobs = list(live.values())
        live.clear()
        log.warning("engine.step_crashed", model=name, live=len(jobs), error=repr(exc))
        spent = {job.seq_id: engine.abort(job.seq_id) for job in jobs}  # still billed
        todo = [jobs]
        while todo:
            group = todo.pop()
            try:
                outputs = run_to_completion(engine, group)
            except Exception as err:
                if len(group) == 1:
                    job = group[0]
                    error = f"engine error: {err!r}"
                    self._emit(Failed(job.seq_id, error, name, compute_s=spent[job.seq_id]))
                else:
                    todo += [group[: len(group) // 2], group[len(group) // 2 :]]
                continue
            stats = engine.stats()
            for job, out in zip(group, outputs, strict=True):
                out.compute_s += spent[job.seq_id]
                self._emit(self._outcome(name, job, out, stats))
