"""Helper threads are niced and batch-scheduled, under their Python names in the OS; the
thread that calls `as_helper_thread` changes alone (per thread, not the engine's)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from worker.service.priority import HELPER_NICENESS, as_helper_thread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling: Linux")


def _in_thread(name: str) -> tuple[int, int, str]:
    """(niceness, scheduling policy, OS name) of a thread named `name` after
    `as_helper_thread()`."""
    seen: list[tuple[int, int, str]] = []

    def body() -> None:
        as_helper_thread()
        tid = threading.get_native_id()
        comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        seen.append((os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid), comm))

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join(10)
    return seen[0]


def test_a_helper_is_niced_and_batch_scheduled_under_its_name() -> None:
    nice, policy, comm = _in_thread("inferq-sweeper-with-a-long-name")
    assert nice >= HELPER_NICENESS  # (run under a higher niceness, it may keep that one)
    assert policy == os.SCHED_BATCH  # it waits for a free core or the tick, never preempts
    assert comm == "inferq-sweeper-"  # the OS keeps 15 bytes


def test_only_the_helper_changes_not_the_engines_thread() -> None:
    tid = threading.get_native_id()
    before = os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)
    _in_thread("inferq-intake")
    assert (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)) == before
