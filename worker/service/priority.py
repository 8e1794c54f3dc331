"""The service's helper threads yield the cores to the engine, under their own names.

On a machine whose cores the engine's matmul threads keep busy, a helper thread that wakes up
(to poll the queue, write results) can preempt one of them, and a parallel region waits for
its slowest thread. The helpers need little CPU (about 2 % of a core each under load); at a
lower priority, and never preempting on wakeup, they run when a core is free, or briefly at
the scheduler's tick. Each also gives the operating system its Python name (`inferq-sink`,
...), so `top -H`, `ps -L` and /proc show which thread takes the cores (bench/cpu_split.py
reads them so).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading

HELPER_NICENESS = 10
_PR_SET_NAME = 15  # prctl(2): the calling thread's name, at most 15 bytes


def as_helper_thread() -> None:
    """Put the calling thread under batch scheduling at a lower priority and name it after its
    Python name (Linux: per thread; else no-op). Under `SCHED_BATCH` a thread that wakes
    never preempts a running one: it takes a free core at once, or waits for the scheduler's
    tick, which still gives it its fair share by niceness (`SCHED_IDLE` does not: it starved
    the intake while the engine ran, docs/benchmarks.md)."""
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, HELPER_NICENESS)
    name_os_thread(threading.current_thread().name)


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (its first 15 bytes) in the operating system."""
    with contextlib.suppress(AttributeError, OSError, TypeError):
        _libc().prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
