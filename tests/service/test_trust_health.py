"""Issue 25, finding 12: health tells the truth. `/readyz` fails while the broker fails or
the engine computes nothing with work pending, and a dead service thread ends `run()` with a
non-zero exit (null engine, real Redis and PostgreSQL)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest
import redis
from service_helpers import running_worker, wait_for

from api_client import InferqClient
from worker.broker import RedisSource
from worker.engine.null import NullEngine
from worker.service.app import WorkerService

pytestmark = pytest.mark.services


def _settings(service_settings, **more):
    return service_settings.model_copy(
        update={"model": "null", "metrics_port": 0, "heartbeat_s": 0.2, **more}
    )


def readyz(service: WorkerService) -> int:
    try:
        url = f"http://127.0.0.1:{service.http.port}/readyz"
        return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_readyz(service: WorkerService, code: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := readyz(service)) != code:
        assert time.monotonic() < deadline, f"/readyz stayed {got}, expected {code}"
        time.sleep(0.05)


class StallingEngine(NullEngine):
    """A null engine whose steps hang while `stalled` is set (a wedged kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled, self.released = threading.Event(), threading.Event()

    def step(self):
        if self.stalled.is_set():
            self.released.wait(30)
        return super().step()


def test_readyz_goes_false_while_the_broker_fails(service_settings, monkeypatch) -> None:
    with running_worker(_settings(service_settings), {"null": NullEngine()}) as service:
        wait_readyz(service, 200)

        def failing(self, limit, wait_s):
            raise redis.ConnectionError("the broker is away")

        monkeypatch.setattr(RedisSource, "receive", failing)
        wait_readyz(service, 503)
        time.sleep(0.5)  # reconnects keep failing: it stays not ready
        assert readyz(service) == 503
        monkeypatch.undo()
        wait_readyz(service, 200)


def test_readyz_goes_false_when_the_engine_stalls_with_work_pending(service_settings) -> None:
    engine = StallingEngine()
    settings = _settings(service_settings, engine_stall_s=0.5)
    with running_worker(settings, {"null": engine}) as service:
        wait_readyz(service, 200)
        time.sleep(1.0)  # idle longer than engine_stall_s: idle is not stalled
        assert readyz(service) == 200
        engine.stalled.set()
        job = InferqClient(settings).submit("Say hi.", params={"max_tokens": 2})
        wait_readyz(service, 503)
        engine.stalled.clear()
        engine.released.set()
        assert wait_for(service.repo, [job])[job].status == "done"
        wait_readyz(service, 200)


class _ThreadKilled(BaseException):
    """Escapes the sweeper's `except Exception`: its thread dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_service_thread_ends_run_with_a_nonzero_exit(service_settings) -> None:
    service = WorkerService(_settings(service_settings), engines={"null": NullEngine()})
    ended: list[BaseException | None] = []
    give_up = threading.Event()  # ends run() if the test fails (no thread left behind)

    def serve() -> None:
        try:
            service.run(until=give_up.is_set)
            ended.append(None)
        except BaseException as exc:
            ended.append(exc)

    runner = threading.Thread(target=serve, daemon=True)
    runner.start()
    try:
        wait_readyz(service, 200)

        def killed() -> int:
            raise _ThreadKilled

        service.sweeper.sweep = killed
        runner.join(20)
        assert not runner.is_alive(), "run() went on with a dead service thread"
    finally:
        give_up.set()
        runner.join(60)
    assert isinstance(ended[0], SystemExit) and ended[0].code not in (0, None)
    assert "inferq-sweeper" in str(ended[0].code)
