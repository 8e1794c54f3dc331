"""The service's helper threads yield the cores to the engine.

On a machine whose cores the engine's matmul threads keep busy, a helper thread that wakes up
(to poll the queue, write results) can preempt one of them, and a parallel region waits for
its slowest thread. The helpers need little CPU (about 2 % of a core each under load); at a
lower priority they run when a core is free, or briefly.
"""

from __future__ import annotations

import contextlib
import os
import threading

HELPER_NICENESS = 10


def as_helper_thread() -> None:
    """Lower the calling thread's scheduling priority (Linux: per thread; else no-op)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HELPER_NICENESS)
