"""The engine's threads take the cores first; the service's helper threads yield them, under
their own names.

On a machine whose cores the engine's matmul threads keep busy, any other thread that wakes up
(a helper polling the queue or writing results; PostgreSQL or Redis on the same host) can
preempt one of them, and a parallel region waits for its slowest thread. The engine loop and
torch's compute threads run at `engine_niceness` (default -5: above the host's other
processes, where the process may raise its priority: root or CAP_SYS_NICE; elsewhere they stay
at 0); the helpers need little CPU (about 2 % of a core each under load) and run
`HELPER_NICENESS` below the engine, so they take a core when one is free, or briefly. Each
helper also gives the operating system its Python name (`inferq-sink`, ...), so `top -H`,
`ps -L` and /proc show which thread takes the cores (bench/cpu_split.py reads them so).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from pathlib import Path

HELPER_NICENESS = 10  # below the engine's threads
_PR_SET_NAME = 15  # prctl(2): the calling thread's name, at most 15 bytes
_TASKS = Path("/proc/self/task")
_engine = [0]  # the niceness the engine's threads run at (as_engine_threads sets it)


def as_engine_threads(niceness: int) -> bool:
    """Give the calling thread (the engine loop) and the process's threads that are not
    Python's (torch's compute threads) `niceness`; False where not permitted (they keep
    theirs). Helpers started afterwards run `HELPER_NICENESS` below it. Linux; else no-op."""
    python = {t.native_id for t in threading.enumerate()} - {threading.get_native_id()}
    try:
        tasks = [int(task.name) for task in _TASKS.iterdir()]
    except OSError:  # not Linux
        return False
    for tid in (t for t in tasks if t not in python):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except (AttributeError, OSError):  # not permitted (EACCES, EPERM)
            return False
    _engine[0] = niceness
    return True


def as_helper_thread() -> None:
    """Lower the calling thread's scheduling priority to `HELPER_NICENESS` below the engine's
    and name it after its Python name (Linux: per thread; else no-op)."""
    with contextlib.suppress(AttributeError, OSError):
        niceness = min(_engine[0] + HELPER_NICENESS, 19)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    name_os_thread(threading.current_thread().name)


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (its first 15 bytes) in the operating system."""
    with contextlib.suppress(AttributeError, OSError, TypeError):
        _libc().prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
