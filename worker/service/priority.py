"""The service's helper threads leave the cores to the engine, under their own names.

On a machine whose cores the engine's matmul threads keep busy, a helper thread that wakes up
(to poll the queue, write results) preempts one of them, and torch's parallel region then
waits for its slowest thread: the helpers' little CPU (a few % of a core) cost the engine
10-15 % of its throughput in the service benchmark. So each helper runs under `SCHED_IDLE`
(sched(7)): it never preempts the engine and runs on a core the engine leaves idle, which it
does between and inside every step (its own Python, its partner thread's waits); it is not
starved, only deferred, and it batches more per wake-up (the sink's CPU fell to a sixth). A
thread that keeps this worker alive for its peers (the sweeper's heartbeat) is only niced, so
a host busy with other programs cannot make its peers take this worker for dead. Each also
gives the operating system its Python name (`inferq-sink`, ...), so `top -H`, `ps -L` and
/proc show which thread takes the cores (bench/cpu_split.py reads them so). Where the OS has
neither, nothing changes.
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


def as_helper_thread(*, liveness: bool = False) -> None:
    """Run the calling thread only where the engine leaves a core idle (`SCHED_IDLE`), or at
    `HELPER_NICENESS` if it keeps this worker's `liveness`; name it after its Python name
    (Linux: per thread; else no-op)."""
    thread = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, thread, HELPER_NICENESS)
    if not liveness:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    name_os_thread(threading.current_thread().name)


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (its first 15 bytes) in the operating system."""
    with contextlib.suppress(AttributeError, OSError, TypeError):
        _libc().prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
