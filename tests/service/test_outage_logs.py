"""A worker whose database is unreachable: it keeps retrying with backoff (no busy loop), its
logs say so, and neither the database password nor frame locals reach them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.services]
PASSWORD = "s3cret-Pw-4711"


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_database_away_logs_no_password_and_backs_off(redis_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "INFERQ_BROKER_URL": redis_url,
        # nothing listens on this port: every database call fails to connect
        "INFERQ_DATABASE_URL": f"postgresql+psycopg://inferq:{PASSWORD}@127.0.0.1:1/inferq",
        "INFERQ_ENGINE": "null",
        "INFERQ_HOME": str(tmp_path),
        "INFERQ_QUEUE": "outage-logs",
        "INFERQ_HEARTBEAT_S": "0.5",
    }
    log = tmp_path / "worker.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferq.cli", "worker", "--loglevel", "DEBUG"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(4)  # started, and failing
        cpu0 = _cpu_s(proc.pid)
        time.sleep(6)
        cpu = _cpu_s(proc.pid) - cpu0
        assert proc.poll() is None, log.read_text()[-2000:]
    finally:
        # SIGKILL: on SIGTERM the sink would spend its 30 s stop timeout retrying what it holds
        proc.kill()
        proc.wait(60)
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line["event"] == "sweeper.failed" for line in lines)
    assert PASSWORD not in text and "locals" not in text
    for library_log in (tmp_path / "logs").glob("worker-*.log"):  # the libraries' output
        assert PASSWORD not in library_log.read_text()
    assert cpu < 0.6, f"{cpu:.2f} CPU s in 6 s: the worker spins while the database is away"
    assert len(lines) < 400  # backoff, not a flood
