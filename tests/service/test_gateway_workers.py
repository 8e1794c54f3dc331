"""`inferq serve --workers 2`: two gateway processes on one port, each answering requests (the
official `openai` SDK, over new connections), and a SIGTERM to `inferq serve` stops both; when
one gateway process dies, the others are stopped and `inferq serve` exits with its status
(128 + the signal's number when a signal killed it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from gateway_helpers import new_key
from service_helpers import running_worker

from worker.engine.null import NullEngine

pytestmark = pytest.mark.services


@pytest.fixture
def settings(service_settings):
    return service_settings.model_copy(update={"model": "null", "gateway_models_cache_s": 0.0})


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(settings, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    port = _free_port()
    env = {
        **os.environ,
        "INFERQ_BROKER_URL": settings.broker_url,
        "INFERQ_DATABASE_URL": settings.database_url,
        "INFERQ_QUEUE": settings.queue,
        "INFERQ_HOME": str(settings.home),
        "INFERQ_MODEL": "null",
        "INFERQ_GATEWAY_MODELS_CACHE_S": "0",  # the worker starts after the gateway
    }
    cmd = [sys.executable, "-m", "inferq.cli", "serve", "--port", str(port), "--workers", "2"]
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield proc, f"{base}/v1"
    finally:
        proc.kill()
        proc.wait()


def test_two_gateway_processes_answer_and_leave_together(settings, served) -> None:
    proc, url = served
    gateways = _children(proc.pid)
    assert len(gateways) == 2
    key = new_key(settings, "acme")
    with running_worker(settings, {"null": NullEngine()}):
        job_ids: set[str] = set()
        for i in range(12):  # a new connection each: the kernel spreads them over both
            with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model="null", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=3
                )
            assert raw.parse().usage.completion_tokens == 3
            job_ids.add(raw.headers["x-inferq-job-id"])
        assert len(job_ids) == 12
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for pid in gateways:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)


def test_one_gateway_process_dying_stops_the_rest(served) -> None:
    proc, _ = served
    first, second = _children(proc.pid)
    os.kill(first, signal.SIGKILL)
    assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    assert not Path(f"/proc/{second}").exists() or "Z" in _state(second)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
