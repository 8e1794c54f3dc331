"""Helper threads run under SCHED_IDLE (only on cores the engine leaves idle), the heartbeat's
thread only niced, each under its Python name in the OS."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from worker.service.priority import HELPER_NICENESS, as_helper_thread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling: Linux")


def _in_thread(name: str, **kwargs: bool) -> tuple[int, int, str]:
    """(policy, niceness, OS name) of a thread named `name` after `as_helper_thread(**kwargs)`."""
    seen: list[tuple[int, int, str]] = []

    def body() -> None:
        as_helper_thread(**kwargs)
        tid = threading.get_native_id()
        comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        seen.append((os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid), comm))

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join(10)
    return seen[0]


def test_a_helper_runs_only_where_a_core_is_idle() -> None:
    policy, nice, comm = _in_thread("inferq-sink")
    assert policy == os.SCHED_IDLE
    assert nice == HELPER_NICENESS
    assert comm == "inferq-sink"


def test_the_heartbeat_thread_is_only_niced() -> None:
    policy, nice, comm = _in_thread("inferq-sweeper-with-a-long-name", liveness=True)
    assert policy == os.SCHED_OTHER
    assert nice == HELPER_NICENESS
    assert comm == "inferq-sweeper-"  # the OS keeps 15 bytes


def test_only_the_helper_changes_not_the_engines_thread() -> None:
    tid = threading.get_native_id()
    before = os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)
    _in_thread("inferq-intake")
    assert (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)) == before
