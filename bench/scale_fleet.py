"""N `inferq worker` processes on one ServiceEnv, for the scale-out benchmark."""

from __future__ import annotations

import subprocess
from pathlib import Path

from service_bench import _wait_ready  # bench/, beside this script
from service_harness import ServiceEnv, start_worker, stop_worker


class Fleet:
    """N workers on one ServiceEnv; every process is stopped on exit, whatever happened."""

    def __init__(self, env: ServiceEnv, n: int, extra: dict[str, str], out: Path, tag: str):
        self.env, self.n, self.extra, self.out, self.tag = env, n, extra, out, tag
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Fleet:
        try:
            logs = {}
            for i in range(self.n):
                name = f"w{i}"
                logs[name] = self.out / f"scale_{self.tag}_{name}.log"
                env = {**self.extra, "INFERQ_WORKER_NAME": name}
                self.procs[name] = start_worker(self.env, env, logs[name], loglevel="INFO")
            for name, proc in self.procs.items():
                _wait_ready(logs[name], proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            proc.terminate()  # all at once: they drain in parallel
        for proc in live:
            stop_worker(proc)
