"""The engine loop: the only thread that touches the engines. It adds, aborts and steps;
it never does I/O. Finished and failed jobs go to the result sink."""

from __future__ import annotations

import heapq
import queue
import threading
import time
import uuid
from collections.abc import Callable

from inferq.logs import get_logger
from worker.engine.api import Engine, run_to_completion
from worker.service.jobs import LiveJob
from worker.service.metrics import Metrics
from worker.service.outcomes import Dropped, Failed, Finished, Outcome
from worker.service.usage import UsageMeter

log = get_logger("inferq.engine_loop")
IDLE_WAIT_S = 0.1


class EngineLoop:
    """Steps every engine that has work, round robin; `submit`/`abort` from any thread."""

    def __init__(
        self,
        engines: dict[str, Engine],
        emit: Callable[[Outcome], None],
        metrics: Metrics,
        worker: str = "",
    ):
        self.engines, self._emit, self.metrics, self.worker = engines, emit, metrics, worker
        self._computed = dict.fromkeys(engines, 0)  # tokens computed so far, per model
        self._deadlines: list[tuple[float, str, str]] = []  # heap: (epoch s, model, seq id)
        self._inbox: queue.SimpleQueue[LiveJob | uuid.UUID] = queue.SimpleQueue()
        self._live: dict[str, dict[str, LiveJob]] = {name: {} for name in engines}
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=self.run, args=(lambda: not self._stop.is_set(),), name="inferq-engine",
            daemon=True,
        )  # fmt: skip

    def start(self) -> None:
        """Run on a thread of its own (see `run` for the faster way)."""
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.thread.join(timeout)

    def submit(self, job: LiveJob) -> None:
        self._inbox.put(job)

    def abort(self, job_id: uuid.UUID) -> None:
        self._inbox.put(job_id)

    def run(self, keep_going: Callable[[], bool]) -> None:
        """Step the engines on the calling thread while `keep_going()`. On CPU, torch's bf16
        matmuls use both cores fully only on the main thread (measured: 1.99 vs 1.36 CPU
        seconds per second elsewhere), so `inferq worker` runs the loop there."""
        meter = UsageMeter(self.worker, self.engines)
        while keep_going():
            busy = any(engine.has_work for engine in self.engines.values())
            self._take(wait=0.0 if busy else IDLE_WAIT_S)
            now = time.time()
            self._expire(now)
            for name, engine in self.engines.items():
                if engine.has_work:
                    self._step(name, engine)
            if meter.due(now):
                self._emit(meter.take(now))
        self._emit(meter.take(time.time()))
        for name, live in self._live.items():  # stopped: what is left goes back to the queue
            for seq_id in live:
                self.engines[name].abort(seq_id)
            live.clear()

    def _take(self, wait: float) -> None:
        """Apply every queued add and abort; wait up to `wait` for the first."""
        try:
            item = self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, LiveJob):
                self._add(item)
            else:
                self._abort(str(item))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, job: LiveJob) -> None:
        try:
            self.engines[job.model].add(job.request)
        except ValueError as exc:
            self._emit(Failed(job.id, f"cannot run: {exc}", job.model))
            return
        self._live[job.model][job.request.seq_id] = job
        if job.expires_at is not None:
            heapq.heappush(
                self._deadlines, (job.expires_at.timestamp(), job.model, job.request.seq_id)
            )

    def _expire(self, now: float) -> None:
        """Drop live jobs whose deadline has passed (waiting or running)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, model, seq_id = heapq.heappop(self._deadlines)
            job = self._live[model].pop(seq_id, None)
            if job is not None:
                spent = self.engines[model].abort(seq_id)
                error = "its deadline passed before it finished"
                self._emit(Failed(job.id, error, model, expired=True, compute_s=spent))

    def _abort(self, seq_id: str) -> None:
        for name, live in self._live.items():
            job = live.pop(seq_id, None)
            if job is not None:
                self._emit(Dropped(job.id, name, self.engines[name].abort(seq_id)))

    def _step(self, name: str, engine: Engine) -> None:
        try:
            outputs = engine.step()
        except Exception as exc:
            self._isolate(name, engine, exc)
            return
        stats = engine.stats()
        self.metrics.engine_step(name, stats, stats.computed_tokens - self._computed[name])
        self._computed[name] = stats.computed_tokens
        if outputs:
            for out in outputs:
                self._emit(Finished(self._live[name].pop(out.seq_id), out, stats))

    def _isolate(self, name: str, engine: Engine, exc: Exception) -> None:
        """A step raised: rerun its live jobs apart (bisecting) so only the culprit fails."""
        live = self._live[name]
        jobs = list(live.values())
        live.clear()
        log.warning("engine.step_crashed", model=name, live=len(jobs), error=repr(exc))
        spent = {job.id: engine.abort(job.request.seq_id) for job in jobs}  # still billed
        todo = [jobs]
        while todo:
            group = todo.pop()
            try:
                outputs = run_to_completion(engine, [j.request for j in group])
            except Exception as err:
                if len(group) == 1:
                    job = group[0]
                    error = f"engine error: {err!r}"
                    self._emit(Failed(job.id, error, name, compute_s=spent[job.id]))
                else:
                    todo += [group[: len(group) // 2], group[len(group) // 2 :]]
                continue
            stats = engine.stats()
            for job, out in zip(group, outputs, strict=True):
                out.compute_s += spent[job.id]
                self._emit(Finished(job, out, stats))
