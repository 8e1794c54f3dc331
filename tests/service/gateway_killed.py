"""Run as a script by test_gateway_resume.py: `inferq serve` (the app under uvicorn, settings
from INFERQ_*) that kills itself with SIGKILL at one point of driving a batch, named by its
argument: `rows:N` right after the N-th chunk of request rows is written, `sent:N` after the
N-th chunk of jobs is enqueued and before it is noted as sent. Prints its base URL."""

from __future__ import annotations

import os
import signal
import sys
import threading

from gateway_helpers import serving

from inferq.settings import get_settings
from storage.batch_feed import BatchFeed


def _kill_at(point: str, nth: int) -> None:
    name = {"rows": "add_requests", "sent": "mark_sent"}[point]
    original, calls = getattr(BatchFeed, name), [0]

    def patched(self: BatchFeed, *args: object) -> None:
        calls[0] += 1
        dies = calls[0] == nth
        if dies and point == "sent":  # its jobs are in the queue, not noted as sent
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, *args)
        if dies:  # its rows are written
            os.kill(os.getpid(), signal.SIGKILL)

    setattr(BatchFeed, name, patched)


if __name__ == "__main__":
    point, nth = sys.argv[1].split(":")
    _kill_at(point, int(nth))
    with serving(get_settings()) as url:
        print(url, flush=True)
        threading.Event().wait()
