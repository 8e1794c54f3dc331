"""The worker service: loads the served models, then runs intake, engine loop and result sink
on three threads until stopped."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from types import FrameType

import redis

from inferq.logs import get_logger
from inferq.settings import Settings, is_redis_url
from storage.records import JobState, JobView
from storage.repository import Repository
from worker.engine.api import Engine
from worker.service.arrivals import Arrival
from worker.service.control import CancelListener
from worker.service.engine_loop import EngineLoop
from worker.service.housekeeping import Housekeeping
from worker.service.intake import Intake, Served
from worker.service.jobs import Ledger
from worker.service.metrics import HealthServer, Metrics
from worker.service.publisher import ResultPublisher, claimed_ids
from worker.service.sink import ResultSink
from worker.service.streamer import Streamer
from worker.service.sweeper import Sweeper
from worker.webhooks import WebhookSender

log = get_logger("inferq.worker")
ENGINE_SWITCH_INTERVAL_S = 0.05


def load_engine(
    settings: Settings, name: str, path: str | None = None, kv_cache_gib: float | None = None
) -> Engine:
    """Prepare (cached) and load one model into the engine `settings.engine` names, with
    `kv_cache_gib` of KV memory (default: all of `settings.kv_cache_gib`)."""
    if settings.engine == "null":
        from worker.engine.null import NullEngine

        return NullEngine(name, max_num_seqs=settings.max_num_seqs)
    from worker.engine.engine import PagedEngine
    from worker.prep.models import resolve_model

    path = resolve_model(settings, name, path)
    config = settings.engine_config(kv_cache_gib=kv_cache_gib or settings.kv_cache_gib)
    engine = PagedEngine(path, name, settings.device, settings.dtype, config)
    engine.warm_up()
    return engine


def kv_split(settings: Settings, paths: dict[str, str]) -> dict[str, float]:
    """Each model's share of the worker's KV memory (GiB): in proportion to its KV bytes per
    token (the same number of tokens each); equal shares when a model is not a local
    directory (a hub id) whose config could be read first."""
    if settings.engine == "null" or not paths:
        return {}
    from worker.engine.memory import kv_shares

    try:
        return kv_shares(settings.kv_cache_gib, paths, settings.device, settings.dtype)
    except (OSError, ValueError, KeyError, TypeError):
        return {name: settings.kv_cache_gib / len(paths) for name in paths}


def load_engines(settings: Settings, have: dict[str, Engine]) -> tuple[dict[str, Engine], dict]:
    """Every served model not in `have`, their KV memory split between them (logged); a model
    that fails to load is reported, not fatal."""
    engines, errors = dict(have), {}
    paths: dict[str, str] = {}
    for name, path in settings.served_models().items():
        if name in engines:
            continue
        try:
            if settings.engine == "null":
                paths[name] = path or name
            else:
                from worker.prep.models import resolve_model

                paths[name] = resolve_model(settings, name, path)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("model.load_failed", model=name, error=errors[name])
    shares = kv_split(settings, paths)
    for name, path in paths.items():
        try:
            engines[name] = load_engine(settings, name, path, shares.get(name))
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("model.load_failed", model=name, error=errors[name])
    if not engines:
        raise RuntimeError(f"no model could be loaded: {errors}")
    plans = {n: e.plan.figures() for n, e in engines.items() if getattr(e, "plan", None)}
    if plans:
        gib = settings.kv_cache_gib if settings.kv_cache_tokens is None else None
        log.info("kv.split", kv_cache_gib=gib, models=plans)
    return engines, errors


def default_worker_name() -> str:
    """host:pid and a random suffix: a restarted container (same host name, pid 1) does not
    inherit its predecessor's identity (held messages, heartbeat, running jobs)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class WorkerService:
    """One worker: `start()` then `stop()`, or `with WorkerService(...)`; `run()` blocks."""

    def __init__(
        self,
        settings: Settings,
        engines: dict[str, Engine] | None = None,
        repo: Repository | None = None,
    ):
        self.settings = settings
        self.worker = settings.worker_name or default_worker_name()
        self.repo = repo or Repository(settings.resolved_database_url)
        self.engines, self.load_errors = load_engines(settings, engines or {})
        self.ledger = Ledger()
        self.metrics = Metrics()
        for name in settings.served_models():
            self.metrics.model_loaded.labels(name).set(name not in self.load_errors)
        devices = {name: engine.device_class for name, engine in self.engines.items()}
        self.publisher, self.cancels, self.streamer = self._results()
        self.sink = ResultSink(
            self.repo,
            self.ledger,
            self.worker,
            self._acknowledge,
            self._abort,
            self.metrics,
            devices,
            commit_interval_s=settings.commit_interval_s,
        )
        stream = self.streamer.put if self.streamer is not None else None
        self.engine_loop = EngineLoop(
            self.engines, self.sink.put, self.metrics, self.worker, stream
        )
        served = {n: Served(e.new_codec(), e.max_context) for n, e in self.engines.items()}
        room = 1 + settings.waiting_room  # the scheduler picks among these what to admit next
        prefetch = sum(round(e.max_num_seqs * room) for e in self.engines.values())
        self.intake = Intake(
            settings,
            self.repo,
            self.ledger,
            self.engine_loop,
            self.sink.put,
            served,
            self.load_errors,
            self.worker,
            prefetch,
            self.metrics,
            self._claimed,
        )
        self.sweeper = Sweeper(
            settings,
            self.repo,
            self.worker,
            sorted(self.engines),
            self.metrics,
            lambda: len(self.ledger),
            self._publish,
        )
        self.housekeeping = Housekeeping(settings, self.repo)
        self.webhooks = WebhookSender(settings, self.repo, self.worker, self.metrics)
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

    def _results(self) -> tuple[ResultPublisher | None, CancelListener | None, Streamer | None]:
        """Results, streams and cancels on Redis (docs/results.md): none without one."""
        url = self.settings.resolved_result_url
        if url is None:
            return None, None, None
        client = redis.Redis.from_url(url, socket_timeout=10, health_check_interval=30)
        broker_url = self.settings.resolved_broker_url
        broker = None
        if broker_url != url and is_redis_url(broker_url):
            broker = redis.Redis.from_url(broker_url, health_check_interval=30)
        publisher = ResultPublisher(self.settings, self.repo, client, self.metrics)
        listener = CancelListener(
            self.settings, self.repo, self.ledger, client, broker, self._drop, publisher.publish
        )
        streamer = Streamer(self.settings, client, self.metrics) if self.settings.stream else None
        return publisher, listener, streamer

    def _publish(
        self,
        job_ids: list[uuid.UUID],
        views: Mapping[uuid.UUID, JobView | None] | None = None,
        wait: bool = False,
    ) -> None:
        """Publish these jobs' states: from the committed `views` where given, else read
        (`wait`: until the publisher has tried to write the views)."""
        if self.publisher is None:
            return
        views = views or {}
        given = [v for i in job_ids if (v := views.get(i)) is not None]
        self.publisher.publish_views(given, wait=wait)
        self.publisher.publish([i for i in job_ids if views.get(i) is None])

    def _claimed(
        self, arrivals: list[Arrival], states: dict[uuid.UUID, JobState]
    ) -> dict[uuid.UUID, JobState]:
        """A claim's jobs: cancelled when a request came first, then published."""
        if self.cancels is not None:
            states = self.cancels.screen(arrivals, states, self.worker)
        ids = claimed_ids(arrivals, states, self.worker)
        self._publish(ids, {i: states[i].view for i in ids})
        return states

    def _acknowledge(
        self, job_ids: list[uuid.UUID], views: dict[uuid.UUID, JobView], owed: bool
    ) -> None:
        """Outcomes committed (the sink): their states published (the sink waits for the
        write: see `publisher.py`), their messages done; the webhook sender woken when they
        may owe webhooks (else it finds other deliveries on its own poll)."""
        self._publish(job_ids, views, wait=True)
        self.intake.acknowledge(job_ids)
        if owed:
            self.webhooks.wake()

    def _abort(self, job_id: uuid.UUID) -> None:
        self.engine_loop.abort(job_id)

    def _drop(self, job_ids: list[uuid.UUID]) -> None:
        """Cancelled jobs this worker runs: out of the engine, their messages acknowledged."""
        for job_id in job_ids:
            self._abort(job_id)
            self.ledger.pop(job_id)
            log.info("job.cancelled_while_running", job_id=str(job_id))
        self.intake.acknowledge(job_ids)

    def _threads(self) -> tuple[threading.Thread, ...]:
        return (
            self._intake_thread,
            self._engine_thread,
            self.sink.thread,
            self.sweeper.thread,
            self.webhooks.thread,
        )

    def alive(self) -> bool:
        """Liveness: every service thread is running."""
        return all(t.is_alive() for t in self._threads())

    def ready(self) -> bool:
        """Readiness: alive; every model it was told to serve loaded; consuming (the broker
        answers); the database answered within three heartbeats; and the engine computed
        within `engine_stall_s` (or had nothing to do)."""
        now = time.monotonic()
        fresh = now - self.sweeper.last_ok < 3 * self.settings.heartbeat_s
        moving = now - self.engine_loop.progress_at < self.settings.engine_stall_s
        loaded = not self.load_errors
        return loaded and fresh and moving and self.intake.ready.is_set() and self.alive()

    def start(self) -> WorkerService:
        """Run everything on background threads (tests, embedding); `stop()` ends it."""
        self._start_threads(engine_loop=True)
        return self

    def _start_threads(self, engine_loop: bool) -> None:
        for helper in (self.publisher, self.cancels, self.streamer):
            if helper is not None:
                helper.start()
        self.sink.start()
        if engine_loop:
            self.engine_loop.start()
        self.sweeper.start()  # beats first: the intake's claims find this worker alive
        self._intake_thread.start()
        self.housekeeping.start()
        self.webhooks.start()
        if self.http is not None:
            self.http.start()
            log.info("worker.http", port=self.http.port)
        if self.load_errors:  # it serves the rest, but is never ready: an operator must look
            log.error("worker.not_ready", worker=self.worker, failed=sorted(self.load_errors))
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
        for helper in (self.streamer, self.cancels, self.publisher):
            if helper is not None:
                helper.stop()
        self._stop.set()
        self.intake.wake.set()
        self._intake_thread.join(timeout)
        self.sweeper.stop()
        self.housekeeping.stop()
        self.webhooks.stop()
        if self.http is not None:
            self.http.stop()
        log.info("worker.stopped", worker=self.worker, unfinished=len(self.ledger))

    def __enter__(self) -> WorkerService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or `until()`), stepping the engines on this thread;
        then drain as `stop` does. A service thread that dies ends it at once (no drain)
        with SystemExit (exit status 1), so the supervisor restarts the process."""
        signalled = threading.Event()
        died: list[str] = []

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
            if died or self._died(died):
                return False
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
        if died:
            raise SystemExit(f"inferq worker: service thread died: {', '.join(died)}")

    def _died(self, died: list[str]) -> bool:
        """Whether a service thread other than the caller's has died (named into `died`)."""
        me = threading.current_thread()
        died += [t.name for t in self._threads() if t is not me and not t.is_alive()]
        if died:
            log.error("worker.thread_died", worker=self.worker, threads=died)
        return bool(died)
