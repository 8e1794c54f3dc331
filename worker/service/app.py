"""The worker service: loads the served models, then runs intake, engine loop and result sink
on three threads until stopped."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType

from inferq.logs import get_logger
from inferq.settings import Settings
from storage.repository import Repository
from worker.engine.api import Engine
from worker.service.engine_loop import EngineLoop
from worker.service.intake import Intake, Served
from worker.service.jobs import Ledger
from worker.service.metrics import HealthServer, Metrics
from worker.service.sink import ResultSink
from worker.service.sweeper import Sweeper

log = get_logger("inferq.worker")
ENGINE_SWITCH_INTERVAL_S = 0.05


def load_engine(settings: Settings, name: str, path: str | None = None) -> Engine:
    """Prepare (cached) and load one model into the engine `settings.engine` names."""
    if settings.engine == "null":
        from worker.engine.null import NullEngine

        return NullEngine(name, max_num_seqs=settings.max_num_seqs)
    from worker.engine.engine import EngineConfig, PagedEngine
    from worker.prep.models import resolve_model

    config = EngineConfig(
        kv_cache_tokens=settings.kv_cache_tokens,
        max_num_seqs=settings.max_num_seqs,
        max_step_tokens=settings.max_step_tokens,
        aging_s=settings.aging_s,
        prefix_cache=settings.prefix_cache,
        cache_secret=settings.cache_secret,
        gptq_backend=settings.gptq_backend,
    )
    engine = PagedEngine(resolve_model(settings, name, path), name, settings.device,
                         settings.dtype, config)  # fmt: skip
    engine.warm_up()
    return engine


def load_engines(settings: Settings, have: dict[str, Engine]) -> tuple[dict[str, Engine], dict]:
    """Every served model not in `have`; a model that fails to load is reported, not fatal."""
    engines, errors = dict(have), {}
    for name, path in settings.served_models().items():
        if name in engines:
            continue
        try:
            engines[name] = load_engine(settings, name, path)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("model.load_failed", model=name, error=errors[name])
    if not engines:
        raise RuntimeError(f"no model could be loaded: {errors}")
    return engines, errors


class WorkerService:
    """One worker: `start()` then `stop()`, or `with WorkerService(...)`; `run()` blocks."""

    def __init__(
        self,
        settings: Settings,
        engines: dict[str, Engine] | None = None,
        repo: Repository | None = None,
    ):
        self.settings = settings
        self.worker = settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.repo = repo or Repository(settings.resolved_database_url)
        self.engines, self.load_errors = load_engines(settings, engines or {})
        self.ledger = Ledger()
        self.metrics = Metrics()
        devices = {name: engine.device_class for name, engine in self.engines.items()}
        self.sink = ResultSink(
            self.repo, self.ledger, self.worker, self._acknowledge, self._abort, self.metrics,
            devices,
        )  # fmt: skip
        self.engine_loop = EngineLoop(self.engines, self.sink.put, self.metrics, self.worker)
        served = {n: Served(e.new_codec(), e.max_context) for n, e in self.engines.items()}
        room = 1 + settings.waiting_room  # the scheduler picks among these what to admit next
        prefetch = sum(round(e.max_num_seqs * room) for e in self.engines.values())
        self.intake = Intake(
            settings, self.repo, self.ledger, self.engine_loop, self.sink.put, served,
            self.load_errors, self.worker, prefetch, self.metrics,
        )  # fmt: skip
        self.sweeper = Sweeper(
            settings, self.repo, self.worker, sorted(self.engines), self.metrics,
            lambda: len(self.ledger),
        )  # fmt: skip
        self.http = (
            None
            if settings.metrics_port is None
            else HealthServer(self.metrics, self.alive, self.ready, settings.metrics_port)
        )
        self._stop = threading.Event()
        self._engine_thread = self.engine_loop.thread  # or the caller's, in run()
        self._intake_thread = threading.Thread(
            target=self.intake.run, args=(self._stop,), name="inferq-intake", daemon=True
        )

    def _acknowledge(self, job_ids: list[uuid.UUID]) -> None:
        self.intake.acknowledge(job_ids)

    def _abort(self, job_id: uuid.UUID) -> None:
        self.engine_loop.abort(job_id)

    def alive(self) -> bool:
        """Liveness: every service thread is running."""
        threads = (self._intake_thread, self._engine_thread, self.sink.thread)
        return all(t.is_alive() for t in (*threads, self.sweeper.thread))

    def ready(self) -> bool:
        """Readiness: alive, consuming, and the database answered within three heartbeats."""
        fresh = time.monotonic() - self.sweeper.last_ok < 3 * self.settings.heartbeat_s
        return self.alive() and self.intake.ready.is_set() and fresh

    def start(self) -> WorkerService:
        """Run everything on background threads (tests, embedding); `stop()` ends it."""
        self._start_threads(engine_loop=True)
        return self

    def _start_threads(self, engine_loop: bool) -> None:
        self.sink.start()
        if engine_loop:
            self.engine_loop.start()
        self._intake_thread.start()
        self.sweeper.start()
        if self.http is not None:
            self.http.start()
            log.info("worker.http", port=self.http.port)
        log.info("worker.ready", worker=self.worker, models=sorted(self.engines))

    def stop(self, drain_s: float | None = None, timeout: float = 30.0) -> None:
        """Stop taking messages; give running jobs `drain_s` (default: the setting) to finish;
        write what finished; put every other held message back on the queue at once."""
        drain_s = self.settings.drain_s if drain_s is None else drain_s
        self.intake.taking.clear()
        deadline = time.monotonic() + drain_s
        while len(self.ledger) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.engine_loop.stop(timeout)
        self._finish(timeout)

    def _finish(self, timeout: float = 30.0) -> None:
        """The engines have stopped: write what finished, hand the rest back, stop."""
        self.sink.stop(timeout)
        self._stop.set()
        self.intake.wake.set()
        self._intake_thread.join(timeout)
        self.sweeper.stop()
        if self.http is not None:
            self.http.stop()
        log.info("worker.stopped", worker=self.worker, unfinished=len(self.ledger))

    def __enter__(self) -> WorkerService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or `until()`), stepping the engines on this thread;
        then drain as `stop` does."""
        signalled = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("worker.signal", signal=signal.Signals(signum).name)
            signalled.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, _on_signal)
        self._engine_thread = threading.current_thread()
        # The engine's Python between torch calls is the hot path: let it keep the GIL for
        # longer slices (the other threads wait on I/O and need it only briefly).
        sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)
        self._start_threads(engine_loop=False)
        deadline = None

        def keep_going() -> bool:
            nonlocal deadline
            if not (signalled.is_set() or (until is not None and until())):
                return True
            if deadline is None:  # stop taking; let what runs finish for drain_s
                self.intake.taking.clear()
                deadline = time.monotonic() + self.settings.drain_s
            return bool(len(self.ledger)) and time.monotonic() < deadline

        try:
            self.engine_loop.run(keep_going)
        finally:
            self._finish()
