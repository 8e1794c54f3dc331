"""`inferq worker` with the default GPTQ model: the terminal gets only inferq's own JSON lines;
what the libraries print while the model loads (gptqmodel's banner, torchao's and torch's
import-time warnings) goes to a file under INFERQ_HOME/logs, which the first line names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.services, pytest.mark.model]


def test_worker_start_prints_only_its_own_json_lines(
    redis_url: str, pg_url: str, gptq_model_path: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "INFERQ_BROKER_URL": redis_url,
        "INFERQ_DATABASE_URL": pg_url,
        "INFERQ_HOME": str(tmp_path),
        "INFERQ_MODEL_PATH": gptq_model_path,
        "INFERQ_QUEUE": "quiet-start",
    }
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferq.cli", "worker"],
        env=env,
        stdout=out.open("wb"),
        stderr=err.open("wb"),
    )
    try:
        deadline = time.monotonic() + 180
        while "worker.ready" not in err.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    lines = err.read_text().splitlines()
    assert out.read_text() == ""
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert {e["logger"].split(".")[0] for e in events} == {"inferq"}, lines
    names = [e["event"] for e in events]
    assert names[0] == "worker.library_output" and "worker.ready" in names
    library = Path(events[0]["path"]).read_text()
    assert "GPT-QModel" in library  # the banner went to the file, not the terminal
