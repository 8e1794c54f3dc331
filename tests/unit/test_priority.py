"""Helper threads are niced, under their Python names in the OS; the thread that calls
`as_helper_thread` changes alone (per thread, not the engine's). The engine's threads (the
caller and torch's compute threads) go above the host's other processes where permitted, and
the helpers stay `HELPER_NICENESS` below them; where not permitted nothing is raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from worker.service.priority import HELPER_NICENESS, as_helper_thread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling: Linux")


def _in_thread(name: str) -> tuple[int, str]:
    """(niceness, OS name) of a thread named `name` after `as_helper_thread()`."""
    seen: list[tuple[int, str]] = []

    def body() -> None:
        as_helper_thread()
        tid = threading.get_native_id()
        comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        seen.append((os.getpriority(os.PRIO_PROCESS, tid), comm))

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join(10)
    return seen[0]


def test_a_helper_is_niced_under_its_name() -> None:
    nice, comm = _in_thread("inferq-sweeper-with-a-long-name")
    assert nice >= HELPER_NICENESS  # (run under a higher niceness, it may keep that one)
    assert comm == "inferq-sweeper-"  # the OS keeps 15 bytes


def test_only_the_helper_changes_not_the_engines_thread() -> None:
    tid = threading.get_native_id()
    before = os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)
    _in_thread("inferq-intake")
    assert (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)) == before


# In a process of its own (priorities are per process state): torch's compute threads exist
# (a parallel matmul), another Python thread runs, then the main thread raises the engine's
# threads and starts a helper; it prints each thread's niceness by kind.
_ENGINE_SCRIPT = """
import json, os, sys, threading
import torch
torch.set_num_threads(2)
torch.ones(512, 512) @ torch.ones(512, 512)
from worker.service.priority import as_engine_threads, as_helper_thread
if sys.argv[1] == "nobody":
    os.setuid(65534)  # no CAP_SYS_NICE: raising is not permitted
other_started, stop = threading.Event(), threading.Event()
other = threading.Thread(target=lambda: (other_started.set(), stop.wait()), name="other")
other.start()
other_started.wait()
raised = as_engine_threads(-5)
helper_nice = []
def helper():
    as_helper_thread()
    helper_nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
h = threading.Thread(target=helper, name="inferq-test")
h.start(); h.join()
python = {t.native_id for t in threading.enumerate()}
native = [int(t) for t in os.listdir("/proc/self/task") if int(t) not in python]
stop.set()
print(json.dumps({
    "raised": raised,
    "main": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
    "native": [os.getpriority(os.PRIO_PROCESS, t) for t in native],
    "other": os.getpriority(os.PRIO_PROCESS, other.native_id),
    "helper": helper_nice[0],
}))
"""


def _engine_niceness(user: str) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", _ENGINE_SCRIPT, user],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=root,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root (CAP_SYS_NICE)")
def test_the_engines_threads_go_above_the_host_and_the_helpers_below_them() -> None:
    seen = _engine_niceness("root")
    assert seen["raised"] is True
    assert seen["main"] == -5
    assert seen["native"] and set(seen["native"]) == {-5}  # torch's compute threads
    assert seen["other"] == 0  # another Python thread is not the engine's
    assert seen["helper"] == -5 + HELPER_NICENESS


@pytest.mark.skipif(os.geteuid() != 0, reason="setuid to nobody needs root")
def test_where_raising_is_not_permitted_nothing_is_raised() -> None:
    seen = _engine_niceness("nobody")
    assert seen["raised"] is False
    assert seen["main"] == 0 and set(seen["native"]) == {0}
    assert seen["helper"] == HELPER_NICENESS
